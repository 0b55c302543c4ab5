"""A tiny Megatron GPTModel for tests: GQA (2 KV groups, 4 heads), RoPE, RMSNorm, SwiGLU, qk-norm.

Weights come from use_cpu_initialization: each rank draws the full TP=1 weight of every layer it
builds from the default CPU generator and keeps its TP shard, so the same seed gives the same
model under any TP size. PP stages build only their own layers, so PP layouts load weights from a
checkpoint instead.
"""

import torch

VOCAB = 64
SEQ = 8


def tiny_gpt(profile, pg_collection, *, num_layers: int = 2, seed: int = 0, tied: bool = False):
    """Build the model for this rank's TP shard and PP stage (groups from initialize_parallel)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=pg_collection.tp.size(),
        pipeline_model_parallel_size=pg_collection.pp.size(),
        pipeline_dtype=profile.params_dtype,
        params_dtype=profile.params_dtype,
        use_cpu_initialization=True,
        **profile.fusion_flags(),
    )
    torch.manual_seed(seed)
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    return GPTModel(
        config=config,
        transformer_layer_spec=profile.gpt_layer_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        pg_collection=pg_collection,
    )


def tiny_batch(seed: int, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Token ids, next-token labels and positions, the same on every rank for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=generator)
    return {
        "input_ids": tokens[:, :-1],
        "position_ids": torch.arange(SEQ).expand(batch_size, SEQ),
        "labels": tokens[:, 1:],
    }


def tiny_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy (the model returns per-token losses when given labels)."""
    return model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"]).mean()
