"""pass@1 of a checkpoint on a prompt dataset, from the command line.

    python -m trb_megatron.eval --checkpoint DIR --data FILE_OR_NAME [--split train]
        [--prompt-field prompt] [--answer-field answer] [--no-chat-template]
        [--system-prompt TEXT|paper] [--verifier math|exact|toy] [--samples 4]
        [--max-new-tokens 1024] [--temperature 1.0] [--seed 0] [--tp 1] [--pp 1] [--nproc N]
        [--limit 0] [--max-prompt-tokens N] [--out results.json]

DIR is a Hugging Face model directory (converted to a Megatron checkpoint in a temporary directory
first), a Megatron checkpoint (tools/convert_hf.py hf-to-megatron, or a training checkpoint
RUN/checkpoints/step_N) or a training run directory (its latest checkpoint). Run directly, it
starts --nproc local processes (default TP x PP; more give data-parallel replicas, gloo on CPU);
under torchrun it uses the launch's processes. Rank 0 prints a table (problems, samples, pass@1,
mean response length) and writes --out as JSON with every response.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from trb_megatron.data.prompts import PAPER_SYSTEM_PROMPT, DataConfig, load_prompts, tokenizer_path


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m trb_megatron.eval", description=doc[0],
                                epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True, help="HF model dir, Megatron checkpoint or training run dir")
    a("--data", required=True, help="a .jsonl/.json/.parquet file or a `datasets` name")
    a("--split", default="train", help="split to read (a local file has only 'train')")
    a("--prompt-field", default="prompt", help="column of prompt texts")
    a("--answer-field", default="answer", help="column of reference answers")
    a("--no-chat-template", dest="chat_template", action="store_false",
      help="tokenize the raw prompt text instead of applying the tokenizer's chat template")
    a("--system-prompt", default="", help="system message ('paper': the paper's step-by-step "
      "\\boxed{} instruction; default none)")
    a("--verifier", default="math", help="math (boxed answer, math-verify) | exact | toy")
    a("--samples", type=int, default=4, help="samples per problem (k)")
    a("--max-new-tokens", type=int, default=1024, help="response length limit")
    a("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    a("--seed", type=int, default=0, help="sampling seed")
    a("--tp", type=int, default=1, help="tensor parallel size")
    a("--pp", type=int, default=1, help="pipeline parallel size")
    a("--nproc", type=int, default=0, help="local processes (default TP x PP); ignored under "
      "torchrun")
    a("--limit", type=int, default=0, help="evaluate only the first N rows (0: all)")
    a("--max-prompt-tokens", type=int, default=0, help="drop longer prompts (default: the "
      "model's max positions minus --max-new-tokens)")
    a("--max-batch-size", type=int, default=64, help="rows per decode batch (KV-cache memory)")
    a("--problems-per-call", type=int, default=32, help="problems per generate() call")
    a("--tmp-dir", default=None, help="where an HF checkpoint is converted (shared by all nodes)")
    a("--out", default=None, help="write the results as JSON here")
    return p


def resolve_checkpoint(path) -> tuple[str, Path]:
    """("hf" | "megatron", directory) of a --checkpoint argument; ValueError if it is neither."""
    from trb_megatron.checkpoint.convert import META
    from trb_megatron.training.checkpointing import latest_checkpoint

    path = Path(path)
    if (path / META).is_file():
        return "megatron", path
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return "megatron", latest
    if (path / "config.json").is_file():
        return "hf", path
    raise ValueError(f"--checkpoint {path} is not a Hugging Face model directory (config.json), "
                     f"a Megatron checkpoint ({META}) or a training run directory "
                     "(checkpoints/latest)")


def _preflight(args) -> tuple[DataConfig, object]:
    """Every check that needs no process group, and the prompts: (data config, PromptSet)."""
    from trb_megatron.checkpoint.convert import inspect_hf
    from trb_megatron.eval.verify import get_verifier
    from trb_megatron.models.arch import ModelArch

    kind, path = resolve_checkpoint(args.checkpoint)
    if kind == "hf":
        inspect_hf(path)
    arch = ModelArch.of_model_dir(path)
    arch.check_parallel(args.tp, args.pp)
    for name in ("samples", "max_new_tokens", "tp", "pp", "max_batch_size", "problems_per_call"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.nproc < 0 or args.nproc % (args.tp * args.pp):
        raise ValueError(f"--nproc {args.nproc} must be a multiple of TP x PP = "
                         f"{args.tp * args.pp} (0: exactly TP x PP)")
    room = arch.max_position_embeddings - args.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                         f"in the model's {arch.max_position_embeddings} positions")
    if args.max_prompt_tokens > room:
        raise ValueError(f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens "
                         f"{args.max_new_tokens} exceed the model's "
                         f"{arch.max_position_embeddings} positions; lower either")
    if not args.answer_field:
        raise ValueError("--answer-field must name the column of reference answers")
    get_verifier(args.verifier)
    system = PAPER_SYSTEM_PROMPT if args.system_prompt == "paper" else args.system_prompt
    data = DataConfig(path_or_name=args.data, split=args.split, prompt_field=args.prompt_field,
                      answer_field=args.answer_field, chat_template=args.chat_template,
                      system_prompt=system, max_prompt_tokens=args.max_prompt_tokens or room,
                      limit=args.limit).validate()
    prompts = load_prompts(data, tokenizer_path(path))
    if len(prompts) == 0:
        raise ValueError(f"no prompt of {args.data} fits: {prompts.loaded} loaded, all longer "
                         f"than {data.max_prompt_tokens} tokens")
    return data, prompts


@contextlib.contextmanager
def _megatron_checkpoint(kind: str, path: Path, tmp_dir):
    """Collective: the Megatron checkpoint to load; an HF directory is converted into a fresh
    temporary directory (rank 0 makes it and shares its name), removed at the end."""
    import torch.distributed as dist

    from trb_megatron.checkpoint.convert import hf_to_megatron

    if kind == "megatron":
        yield path
        return
    name = [tempfile.mkdtemp(prefix="trb-eval-", dir=tmp_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    root = Path(name[0])
    try:
        hf_to_megatron(path, root / "megatron", progress=dist.get_rank() == 0)
        yield root / "megatron"
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)


def _worker(rank, world, args, data, prompts):
    """One process: load the student, evaluate its share, rank 0 reports."""
    from trb_megatron.checkpoint.convert import load_megatron, parallel_layout
    from trb_megatron.data.prompts import load_tokenizer
    from trb_megatron.eval.pass1 import evaluate_pass1
    from trb_megatron.models.pairing import stop_ids
    from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine
    from trb_megatron.methods import VocabLayout

    kind, path = resolve_checkpoint(args.checkpoint)
    with _megatron_checkpoint(kind, path, args.tmp_dir) as checkpoint, \
            parallel_layout(args.tp, args.pp, seed=args.seed) as groups:
        arch, student = load_megatron(checkpoint, groups)
        vocab = VocabLayout(size=arch.vocab_size, stop_ids=stop_ids(checkpoint / "hf"))
        engine = MegatronRolloutEngine(student, None, groups, vocab=vocab,
                                       pad_id=vocab.stop_ids[0], max_batch_size=args.max_batch_size)
        result = evaluate_pass1(engine, prompts, load_tokenizer(checkpoint), samples=args.samples,
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                verifier=args.verifier, temperature=args.temperature,
                                dp_group=groups.dp, problems_per_call=args.problems_per_call)
        dp = groups.dp.size()
    if rank == 0:
        print(_table(args, prompts, data, result, kind), flush=True)
        if args.out:
            _write_json(args, data, prompts, result, dp)


def _table(args, prompts, data, result, kind) -> str:
    source = "Hugging Face, converted" if kind == "hf" else "Megatron"
    return "\n".join([
        f"checkpoint  {args.checkpoint} ({source})",
        f"data        {args.data} [{args.split}]: {prompts.loaded} loaded, "
        f"{prompts.dropped_too_long} dropped (> {data.max_prompt_tokens} prompt tokens)",
        f"{'problems':>8}  {'samples':>7}  {'pass@1':>7}  {'mean response tokens':>20}  "
        f"{'truncated':>9}",
        f"{result.problems:>8}  {result.samples:>7}  {result.pass1:>7.4f}  "
        f"{result.mean_response_tokens:>20.1f}  {result.truncated_fraction:>9.1%}",
    ])


def _write_json(args, data, prompts, result, dp: int) -> None:
    per_problem = [dict(row=prompts.rows[p.index], prompt=prompts.texts[p.index],
                        answer=prompts.answers[p.index], **dataclasses.asdict(p))
                   for p in result.per_problem]
    record = dict(checkpoint=str(args.checkpoint), data=dataclasses.asdict(data),
                  verifier=args.verifier, samples=args.samples,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  seed=args.seed, tp=args.tp, pp=args.pp, dp=dp, loaded=prompts.loaded,
                  dropped_too_long=prompts.dropped_too_long, problems=result.problems,
                  pass1=result.pass1, mean_response_tokens=result.mean_response_tokens,
                  truncated_fraction=result.truncated_fraction, per_problem=per_problem)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, out)
    print(f"wrote {out}", flush=True)


def main(argv=None) -> int:
    """The entry point (the only place argv and the environment are read)."""
    args = _parser().parse_args(argv)
    try:
        data, prompts = _preflight(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:  # torchrun / srun
        import torch.distributed as dist

        from trb_megatron.parallel import detect_profile

        dist.init_process_group(detect_profile().distributed_backend)
        try:
            _worker(dist.get_rank(), dist.get_world_size(), args, data, prompts)
        finally:
            dist.destroy_process_group()
    else:
        from trb_megatron.parallel.local_launch import spawn_local

        spawn_local(_worker, args.nproc or args.tp * args.pp, args, data, prompts)
    return 0
