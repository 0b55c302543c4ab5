"""Rollout throughput of the two backends on the same models, prompts and batch, in one run.

    .venv/bin/python benchmarks/rollout_throughput.py              # the toy models, 128 rows
    .venv/bin/python benchmarks/rollout_throughput.py --prompts 16 --samples 2 --repeats 1

Rows: the megatron backend (the trainer's own GPTModels decoding in lockstep, --tp gloo
processes) and the sglang backend (an offline SGLang engine on the TRB composite model, TP=1,
through the CPU backend here), each at eps > 0 (the blend: student and teacher decode) and
eps = 0 (the student alone; for SGLang both the composite engine at eps = 0 and the
student-only engine the trainer restarts into when eps reaches 0). Response tokens per second
of wall time over --repeats timed calls after one warm-up call; ratios against the megatron
backend's eps = 0 row of the same run. Never part of the test suite.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trb_megatron.methods import BehaviourStep
from trb_megatron.parallel.local_launch import spawn_local

ROOT = Path(__file__).resolve().parents[1]


def _prompts(toy_dir: Path, count: int) -> list[list[int]]:
    from trb_megatron.data import load_tokenizer

    tokenizer = load_tokenizer(toy_dir / "student")
    lines = (toy_dir / "data" / "train.jsonl").read_text().splitlines()[:count]
    return [tokenizer(json.loads(line)["prompt"]).input_ids for line in lines]


def _timed(generate, repeats: int):
    """(response tokens of one call, median seconds over `repeats` calls after a warm-up)."""
    batch = generate()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        batch = generate()
        seconds.append(time.perf_counter() - start)
    return int(batch.response_mask.sum()), statistics.median(seconds)


def _megatron_worker(rank, world, args, work, out):
    from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
    from trb_megatron.models.pairing import shared_vocab_layout
    from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine

    toy = Path(args.toy_dir)
    for name in ("student", "teacher"):
        hf_to_megatron(toy / name, Path(work) / name, progress=False, overwrite=True)
    vocab = shared_vocab_layout(toy / "student", toy / "teacher")
    prompts = _prompts(toy, args.prompts)
    rows = {}
    with parallel_layout(world, 1) as groups:
        _, student = load_megatron(Path(work) / "student", groups)
        _, teacher = load_megatron(Path(work) / "teacher", groups)
        engine = MegatronRolloutEngine(student, teacher, groups, vocab=vocab,
                                       pad_id=vocab.stop_ids[0])
        for eps in (args.eps, 0.0):
            rows[f"megatron TP={world}, eps={eps:g}"] = _timed(
                lambda: engine.generate(prompts, samples_per_prompt=args.samples,
                                        max_new_tokens=args.max_new_tokens,
                                        behaviour=BehaviourStep(eps=eps), seed=1),
                args.repeats)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _sglang_rows(args) -> dict:
    from trb_megatron.config import SGLangConfig
    from trb_megatron.models.pairing import shared_vocab_layout
    from trb_megatron.rollout.request import RolloutRequest
    from trb_megatron.rollout.sglang_engine import check_plugin, engine_kwargs
    from trb_megatron.rollout.sglang_requests import assemble_batch, prompt_ids, sampling_params
    from trb_megatron.sglang_plugin.engine_shutdown import shutdown_engine
    from trb_megatron.sglang_plugin.passthrough import PassThrough
    from trb_megatron.sglang_plugin.version import require_sglang

    sglang = require_sglang()
    check_plugin()
    toy = Path(args.toy_dir)
    vocab = shared_vocab_layout(toy / "student", toy / "teacher")
    prompts = _prompts(toy, args.prompts)
    processor = PassThrough().to_str()
    rows = {}
    settings = SGLangConfig(max_running_requests=max(args.prompts * args.samples, 1))
    for teacher, label in ((toy / "teacher", "composite"), (None, "student-only")):
        engine = sglang.Engine(**engine_kwargs(settings, student_dir=toy / "student",
                                               teacher_dir=teacher, vocab=vocab, tp_size=1,
                                               seed=0))
        try:
            for eps in (args.eps, 0.0) if teacher else (0.0,):
                request = RolloutRequest.build(
                    prompts, samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                    behaviour=BehaviourStep(eps=eps), seed=1, prompt_offset=0,
                    vocab_size=vocab.size, max_positions=512)

                def generate():
                    outputs = engine.generate(
                        input_ids=prompt_ids(request),
                        sampling_params=sampling_params(request, vocab), return_logprob=True,
                        custom_logit_processor=[processor] * request.rows)
                    return assemble_batch(request, outputs, vocab=vocab,
                                          pad_id=vocab.stop_ids[0])

                rows[f"sglang TP=1 {label}, eps={eps:g}"] = _timed(generate, args.repeats)
        finally:
            shutdown_engine(engine)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy-dir", default=str(ROOT / "runs" / "toy_models"),
                        help="a toy build (tools/make_toy_models.py; built here if missing)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--tp", type=int, default=2, help="megatron backend TP (processes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from trb_megatron.toy.build import ToyBuildSpec, build_toy_models

    if not (Path(args.toy_dir) / "manifest.json").is_file():
        build_toy_models(args.toy_dir, ToyBuildSpec())
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "megatron.json"
        spawn_local(_megatron_worker, args.tp, args, work, str(out))
        rows = json.loads(out.read_text())
    rows.update(_sglang_rows(args))
    base_tokens, base_seconds = rows[f"megatron TP={args.tp}, eps=0"]
    base = base_tokens / base_seconds
    print(f"\n{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new "
          f"tokens, torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats} calls after a warm-up\n")
    print("| backend | response tokens | seconds | tokens/s | vs megatron eps=0 |")
    print("|---|---|---|---|---|")
    for name, (tokens, seconds) in rows.items():
        rate = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.2f} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
