"""Build the student (trainable) and the frozen teacher as Megatron-Core GPTModels.

One builder for both: the same TransformerConfig recipe, layer spec (from the backend profile:
Transformer Engine on GPUs with TE, local layers otherwise) and TP/PP layout. The teacher is put
in eval mode with requires_grad off; it must never be handed to an optimizer or wrapped in DDP.
"""

import dataclasses

import torch

from trb_megatron.models.arch import ModelArch


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Settings:
    """Transformer Engine FP8 (GPU with TE only). format: 'hybrid' (E4M3 forward, E5M2
    backward) or 'e4m3'; recipe: 'delayed' | 'tensorwise' | 'mxfp8' | 'blockwise'; margin and
    amax history as in TE; bf16_edge_layers: keep this many first and last layers in bf16."""

    enabled: bool = False
    format: str = "hybrid"
    recipe: str = "delayed"
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    bf16_edge_layers: int = 0

    def transformer_config_kwargs(self, profile) -> dict:
        if not self.enabled:
            return {}
        if not profile.transformer_engine:
            raise ValueError("fp8.enabled needs a GPU with transformer_engine installed "
                             "(pip install 'trb-megatron[te]'); set fp8.enabled=false here")
        kwargs = dict(fp8=self.format, fp8_recipe=self.recipe, fp8_margin=self.margin,
                      fp8_amax_history_len=self.amax_history_len,
                      fp8_amax_compute_algo=self.amax_compute_algo)
        if self.bf16_edge_layers:
            kwargs.update(first_last_layers_bf16=True,
                          num_layers_at_start_in_bf16=self.bf16_edge_layers,
                          num_layers_at_end_in_bf16=self.bf16_edge_layers)
        return kwargs


def transformer_config(arch: ModelArch, profile, pg_collection, *, params_dtype=None,
                       fp8: FP8Settings = FP8Settings()):
    """The TransformerConfig for `arch` under the groups' TP/PP sizes and the profile."""
    from megatron.core.transformer import TransformerConfig

    tp, pp = pg_collection.tp.size(), pg_collection.pp.size()
    arch.check_parallel(tp, pp)
    dtype = params_dtype or profile.params_dtype
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        # Set here, not only in the spec: megatron all-reduces q/k-norm grads over TP only then.
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=profile.device.type == "cpu",
        **profile.fusion_flags(),
        **fp8.transformer_config_kwargs(profile),
    )


def build_model(arch: ModelArch, profile, pg_collection, *, trainable: bool, params_dtype=None,
                fp8: FP8Settings = FP8Settings()):
    """This rank's GPTModel stage for `arch`; trainable=False gives a frozen (teacher) model."""
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, profile, pg_collection, params_dtype=params_dtype, fp8=fp8)
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=profile.gpt_layer_spec(qk_layernorm=arch.qk_norm,
                                                      normalization="RMSNorm"),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        pg_collection=pg_collection,
    )
    if profile.device.type == "cuda":
        model.cuda(torch.cuda.current_device())
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model
