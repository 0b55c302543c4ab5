"""Train and evaluate the toy Qwen3 models with plain torch on CPU.

Every toy sequence has the same length (<bos> + 10 prompt characters + 41 response characters +
<eos> = 53 tokens), so batches are dense [B, 53] tensors with no padding, and all prompts of a
batch decode in lockstep.
"""

import inspect
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from trb_megatron.toy.task import PROMPT_CHARS, RESPONSE_CHARS, is_correct, is_well_formed

PROMPT_TOKENS = PROMPT_CHARS + 1        # <bos> + characters
RESPONSE_TOKENS = RESPONSE_CHARS + 1    # characters + <eos>


@dataclass(frozen=True)
class ModelSize:
    """A Qwen3 shape. Student and teacher share num_kv_heads and head_dim (the SGLang composite
    model needs them equal); hidden = num_heads * head_dim."""
    layers: int
    hidden: int
    num_heads: int
    intermediate: int
    num_kv_heads: int = 2
    head_dim: int = 32


TEACHER_SIZE = ModelSize(layers=4, hidden=128, num_heads=4, intermediate=256)
STUDENT_SIZE = ModelSize(layers=2, hidden=64, num_heads=2, intermediate=192)


def make_model(size: ModelSize, vocab_size: int, special_ids: dict, seed: int):
    """A freshly initialised fp32 Qwen3ForCausalLM (initialisation seeded by `seed`)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if size.num_heads % size.num_kv_heads:
        raise ValueError(f"num_heads {size.num_heads} is not a multiple of num_kv_heads "
                         f"{size.num_kv_heads}")
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads, head_dim=size.head_dim,
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, attention_dropout=0.0, attn_implementation="eager",
        **special_ids)  # eager attention: ~10% faster than sdpa at these sizes on CPU
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float()


def encode(tokenizer, problems) -> torch.Tensor:
    """[N, 53] token ids of <bos> prompt response <eos>."""
    eos = tokenizer.eos_token_id
    rows = [tokenizer(p["prompt"])["input_ids"]
            + tokenizer(p["response"], add_special_tokens=False)["input_ids"] + [eos]
            for p in problems]
    ids = torch.tensor(rows, dtype=torch.long)
    if ids.shape[1] != PROMPT_TOKENS + RESPONSE_TOKENS:
        raise ValueError(f"toy sequences must be {PROMPT_TOKENS + RESPONSE_TOKENS} tokens, "
                         f"got {ids.shape[1]}")
    return ids


def response_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the response tokens (EOS included); the prompt is not trained."""
    logits = model(input_ids=ids[:, :-1]).logits[:, PROMPT_TOKENS - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           ids[:, PROMPT_TOKENS:].reshape(-1))


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    cosine: bool = True  # decay to lr/10 over `steps` after the warmup


def _lr(settings: TrainSettings, step: int) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    if not settings.cosine:
        return settings.lr
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_sft(model, train_ids: torch.Tensor, settings: TrainSettings, *, seed: int,
              log=print, name="model", log_every=50, callback=None) -> dict:
    """AdamW on the response tokens; batches drawn from a seeded permutation per epoch.
    `callback(step, model)` runs after optimiser steps `step` (1-based) that are multiples of
    `log_every` and may return a dict of metrics to log, or "stop" in it to end training.
    Returns {"steps", "losses" (mean per log interval), "seconds", "history" (callback dicts)}."""
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                              weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(train_ids), generator=gen), 0
    losses, history, window, start = [], [], [], time.perf_counter()
    step = 0
    while step < settings.steps:
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(train_ids), generator=gen), 0
        batch = train_ids[order[cursor:cursor + settings.batch_size]]
        cursor += settings.batch_size
        for group in optim.param_groups:
            group["lr"] = _lr(settings, step)
        loss = response_loss(model, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        window.append(loss.item())
        step += 1
        if step % log_every == 0 or step == settings.steps:
            losses.append(sum(window) / len(window))
            window = []
            extra = {}
            if callback is not None:
                model.eval()
                extra = callback(step, model) or {}
                model.train()
                history.append({"step": step, "loss": losses[-1], **extra})
            shown = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in extra.items() if k != "stop")
            log(f"[{name}] step {step}/{settings.steps} loss {losses[-1]:.4f} "
                f"({time.perf_counter() - start:.0f}s) {shown}".rstrip())
            if extra.get("stop"):
                break
    model.eval()
    return {"steps": step, "losses": losses, "seconds": time.perf_counter() - start,
            "history": history}


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, *, eos_id: int, pad_id: int,
             temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = RESPONSE_TOKENS + 8) -> torch.Tensor:
    """Decode equal-length prompts [B, P] with the KV cache: greedy at temperature 0, else exact
    sampling at `temperature` (no top-k/top-p). Returns [B, <= max_new_tokens] response ids;
    after EOS a row holds pad_id."""
    gen = torch.Generator().manual_seed(seed)
    # transformers 5.2x renamed past_key_values to cache; 4.x only knows the old name
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    out = model(input_ids=prompt_ids, use_cache=True)
    past, logits = getattr(out, cache_kw), out.logits[:, -1]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.double() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        out = model(input_ids=nxt[:, None], use_cache=True, **{cache_kw: past})
        past, logits = getattr(out, cache_kw), out.logits[:, -1]
    return torch.stack(tokens, 1)


def evaluate(model, tokenizer, problems, *, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 512) -> dict:
    """Exact-match accuracy of the final answer and the fraction of well-formed responses
    (a response that does not end in EOS within the token limit counts as neither)."""
    model.eval()
    correct = formed = 0
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo:lo + batch_size]
        prompts = torch.tensor([tokenizer(p["prompt"])["input_ids"] for p in chunk])
        out = generate(model, prompts, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, temperature=temperature, seed=seed + lo)
        for p, row in zip(chunk, out.tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True)
            ended = tokenizer.eos_token_id in row
            correct += ended and is_correct(text, p["answer"])
            formed += ended and is_well_formed(text)
    n = max(1, len(problems))
    return {"accuracy": correct / n, "well_formed": formed / n}


def size_dict(size: ModelSize, model) -> dict:
    return {**asdict(size), "parameters": sum(p.numel() for p in model.parameters())}
