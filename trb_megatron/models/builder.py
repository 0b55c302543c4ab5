"""Build the student (trainable) and the frozen teacher as Megatron-Core GPTModels.

One builder for both: the same TransformerConfig recipe, layer spec (from the backend profile:
Transformer Engine on GPUs with TE, local layers otherwise), FP8 settings (the profile's) and
TP/PP layout. The teacher is put in eval mode with requires_grad off; it must never be handed to
an optimizer or wrapped in DDP.
"""

import torch

from trb_megatron.models.arch import ModelArch


def transformer_config_kwargs(arch: ModelArch, profile, *, tp: int, pp: int,
                              params_dtype=None) -> dict:
    """TransformerConfig keyword arguments for `arch` at TP x PP under the profile (dtype, fused
    kernels, FP8); plain values, so a GPU profile's can be inspected on any machine."""
    arch.check_parallel(tp, pp)
    dtype = params_dtype or profile.params_dtype
    return dict(
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
        **profile.fp8.transformer_config_kwargs(),
    )


def transformer_config(arch: ModelArch, profile, pg_collection, *, params_dtype=None):
    """The TransformerConfig for `arch` under the groups' TP/PP sizes and the profile."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(
        arch, profile, tp=pg_collection.tp.size(), pp=pg_collection.pp.size(),
        params_dtype=params_dtype))


def build_model(arch: ModelArch, profile, pg_collection, *, trainable: bool, params_dtype=None):
    """This rank's GPTModel stage for `arch`; trainable=False gives a frozen (teacher) model."""
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, profile, pg_collection, params_dtype=params_dtype)
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
    if profile.fp8.enabled:
        # FP8 GEMMs need row counts that are multiples of 16; rollouts decode one token per row
        # and training batches have any length. Megatron's wrapper pads/unpads the sequence
        # dimension around each TE linear layer inside the FP8 context (autograd included).
        from megatron.core.fp8_utils import prepare_model_for_fp8_inference

        prepare_model_for_fp8_inference(model)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model
