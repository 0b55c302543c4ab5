"""Tiny random Hugging Face checkpoints made with transformers (no hub): Qwen3 with
head_dim != hidden/heads and fewer KV heads than heads, tied or untied; Llama 3 with its rope
scaling; Qwen2 with qkv bias. Each directory also gets a real tokenizer (tokenizers WordLevel)."""

import torch

VOCAB = 120  # not a multiple of 128: exercises the padded vocabulary


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(VOCAB - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def make_hf_model(out_dir, family="qwen3", *, tied=False, seed=0, layers=2):
    """Save a random tiny model of `family` (qwen3 | llama | qwen2) to out_dir; returns it."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if family == "qwen3":
        config, cls = Qwen3Config(head_dim=16, rope_theta=1e6, **common), Qwen3ForCausalLM
    elif family == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        config = LlamaConfig(rope_theta=5e5, rope_scaling=scaling, **common)
        cls = LlamaForCausalLM
    elif family == "qwen2":
        config, cls = Qwen2Config(rope_theta=1e6, **common), Qwen2ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():  # norms and biases away from their init so mapping errors show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    _tokenizer().save_pretrained(out_dir)
    return model
