"""Build (or reuse) the embedded toy default: data, tokenizer, a strong teacher and a weak student.

    OUT/data/{train,test,val}.jsonl     fields prompt, answer, response (disjoint splits)
    OUT/teacher/, OUT/student/          Hugging Face Qwen3 checkpoints (fp32 safetensors) with
                                        the same tokenizer files and EOS id
    OUT/manifest.json                   the build arguments (the cache key), sizes, training
                                        curves and measured held-out accuracies

The build is written to OUT.partial and renamed into place at the end, so an interrupted build
leaves no half cache. A second call with the same arguments reuses OUT; other arguments
rebuild it; a directory that is not a toy build is refused unless `force`.

Reproducibility: a build is a function of its spec (seed, sizes, and the torch thread count:
reduction order depends on it) and of the vector instruction set torch's kernels and MKL run
(`cpu_capability` in the cache key; see trb_megatron/parallel/cpu_isa.py for what it changes).
`build_pinned` (what the job and tools/make_toy_models.py call) builds in a child process with
the instruction set pinned, so a spec gives the same build on every x86-64 machine with AVX2.

The teacher trains until the validation split is solved (greedy >= 99% and temperature-1
sampled >= `teacher_stop_sampled`) or `teacher_steps`. The student is snapshotted at the first
evaluation (every `student_eval_every` steps) where it writes the format and its greedy
validation accuracy reaches `student_target`: it knows the format but is weak, so distillation
has room to improve it. Selection uses the validation split, never the held-out test split.
"""

import contextlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trb_megatron.parallel.cpu_isa import pinned_environment
from trb_megatron.toy import task
from trb_megatron.toy.tokenizer import build_tokenizer, special_ids
from trb_megatron.toy.train import (PROMPT_TOKENS, RESPONSE_TOKENS, STUDENT_SIZE, TEACHER_SIZE,
                                    ModelSize, TrainSettings, encode, evaluate, make_model,
                                    size_dict, train_sft)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
OUTPUTS = ("student", "teacher", "data/train.jsonl", "data/test.jsonl", "data/val.jsonl")
"""What a build creates in OUT, which configs name before the first build has run."""


@dataclass(frozen=True)
class ToyBuildSpec:
    """Everything that determines a toy build (the cache key)."""
    seed: int = 0
    n_train: int = 20000
    n_test: int = 512
    n_val: int = 256
    teacher: ModelSize = TEACHER_SIZE
    student: ModelSize = STUDENT_SIZE
    batch_size: int = 128
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    teacher_eval_every: int = 50
    teacher_stop_sampled: float = 0.95
    student_max_steps: int = 600
    student_lr: float = 2e-3
    student_eval_every: int = 20
    student_target: float = 0.10
    sampled_temperature: float = 1.0
    threads: int = 2

    def key(self, cpu_capability: str) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self),
                "cpu_capability": cpu_capability}


def _check_spec(spec: ToyBuildSpec) -> None:
    if spec.teacher.num_kv_heads != spec.student.num_kv_heads \
            or spec.teacher.head_dim != spec.student.head_dim:
        raise ValueError("teacher and student need the same num_kv_heads and head_dim, got "
                         f"{spec.teacher} and {spec.student}")
    for size in (spec.teacher, spec.student):
        if size.hidden != size.num_heads * size.head_dim:
            raise ValueError(f"hidden must equal num_heads * head_dim, got {size}")
    if min(spec.n_train, spec.n_test, spec.n_val, spec.batch_size, spec.teacher_steps,
           spec.student_max_steps, spec.teacher_eval_every, spec.student_eval_every,
           spec.threads) < 1:
        raise ValueError(f"sizes and steps must be >= 1, got {spec}")


def _save_model(model, tokenizer, directory: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**special_ids(tokenizer))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    # transformers 5 writes its own class name, which 4.x cannot resolve; both load this one
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _measure(model, tokenizer, problems, spec: ToyBuildSpec, seed: int) -> dict:
    greedy = evaluate(model, tokenizer, problems)
    sampled = evaluate(model, tokenizer, problems, temperature=spec.sampled_temperature,
                       seed=seed)
    return {"test_greedy_accuracy": greedy["accuracy"],
            "test_sampled_accuracy": sampled["accuracy"],
            "test_greedy_well_formed": greedy["well_formed"],
            "test_sampled_well_formed": sampled["well_formed"]}


def _train_teacher(spec, tokenizer, train_ids, val, log):
    def check(step, model):
        greedy = evaluate(model, tokenizer, val)["accuracy"]
        sampled = evaluate(model, tokenizer, val, temperature=spec.sampled_temperature,
                           seed=spec.seed + step)["accuracy"]
        return {"val_greedy": greedy, "val_sampled": sampled,
                "stop": greedy >= 0.99 and sampled >= spec.teacher_stop_sampled}

    model = make_model(spec.teacher, len(tokenizer), special_ids(tokenizer), spec.seed)
    settings = TrainSettings(steps=spec.teacher_steps, batch_size=spec.batch_size,
                             lr=spec.teacher_lr, warmup_steps=min(20, spec.teacher_steps),
                             cosine=True)
    result = train_sft(model, train_ids, settings, seed=spec.seed * 1009 + 1, log=log,
                       name="teacher", log_every=spec.teacher_eval_every, callback=check)
    return model, result


def _train_student(spec, tokenizer, train_ids, val, log):
    reached = []

    def check(step, model):
        metrics = evaluate(model, tokenizer, val)
        done = metrics["well_formed"] >= 0.9 and metrics["accuracy"] >= spec.student_target
        reached.extend([step] if done else [])
        return {"val_greedy": metrics["accuracy"], "val_well_formed": metrics["well_formed"],
                "stop": done}

    model = make_model(spec.student, len(tokenizer), special_ids(tokenizer), spec.seed + 1)
    # constant learning rate: the snapshot step must not change the schedule before it
    settings = TrainSettings(steps=spec.student_max_steps, batch_size=spec.batch_size,
                             lr=spec.student_lr, warmup_steps=min(20, spec.student_max_steps),
                             cosine=False)
    result = train_sft(model, train_ids, settings, seed=spec.seed * 1009 + 2, log=log,
                       name="student", log_every=spec.student_eval_every, callback=check)
    if not reached:
        log(f"[student] warning: the target (val greedy >= {spec.student_target}, well formed "
            f">= 0.9) was not reached in {spec.student_max_steps} steps; keeping the last step")
    return model, {**result, "target_reached": bool(reached)}


def _cached(out: Path, spec: ToyBuildSpec, cpu_capability: str, log) -> dict | None:
    """The manifest of a complete build of `spec` in `out`, or None (absent, empty, another
    spec's build, incomplete: all rebuilt). ValueError when `out` holds something that is not
    a toy build, which is never replaced without force."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    path = out / MANIFEST
    if not path.is_file():
        raise ValueError(f"{out} exists and holds no toy build ({MANIFEST} missing); pass "
                         "--force (force=True) to replace it, or choose another --out-dir")
    manifest = json.loads(path.read_text())
    key = json.loads(json.dumps(spec.key(cpu_capability)))
    old = manifest.get("build", {})
    if old != key:
        differ = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        log(f"rebuilding {out}: it holds a toy build with other arguments ({', '.join(differ)})")
        return None
    missing = [name for name in ("teacher/config.json", "teacher/model.safetensors",
                                 "teacher/tokenizer.json", "student/config.json",
                                 "student/model.safetensors", "student/tokenizer.json",
                                 "data/train.jsonl", "data/test.jsonl")
               if not (out / name).is_file()]
    if missing:
        log(f"rebuilding {out}: incomplete (missing {', '.join(missing)})")
        return None
    return manifest


def build_toy_models(out_dir, spec: ToyBuildSpec = ToyBuildSpec(), *, force: bool = False,
                     log=print) -> dict:
    """Build the toy data and models into `out_dir` and return the manifest. An earlier build
    of the same spec there is reused (unless `force`); one of another spec is replaced; a
    directory that is not a toy build raises ValueError (unless `force`).
    `manifest["reused"]` tells whether the cache was used (it is not stored in the file)."""
    _check_spec(spec)
    out = Path(out_dir).resolve()
    capability = torch.backends.cpu.get_cpu_capability()
    if not force:
        manifest = _reuse(out, spec, capability, log)
        if manifest is not None:
            return manifest
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        return _build(out, spec, capability, log)
    finally:
        torch.set_num_threads(threads)


def _reuse(out: Path, spec: ToyBuildSpec, capability: str, log) -> dict | None:
    manifest = _cached(out, spec, capability, log)
    if manifest is not None:
        log(f"reusing cached toy models in {out} (seed {spec.seed}; --force rebuilds)")
        return {**manifest, "reused": True}
    return None


@contextlib.contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _print(message: str) -> None:
    print(message, flush=True)


def _child_build(out: Path, spec: ToyBuildSpec) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Writing model shards" bars drown the log
    return build_toy_models(out, spec, force=True, log=_print)


def build_pinned(out_dir, spec: ToyBuildSpec = ToyBuildSpec(), *, force: bool = False,
                 log=_print) -> dict:
    """`build_toy_models` in a child process whose vector instruction set is pinned
    (cpu_isa.pinned_environment), so the same spec gives the same build on every machine. A
    cached build is reused without starting the child, which logs with print. ValueError as
    build_toy_models."""
    _check_spec(spec)
    out = Path(out_dir).resolve()
    environment, capability = pinned_environment()
    if not force:
        manifest = _reuse(out, spec, capability, log)
        if manifest is not None:
            return manifest
    context = multiprocessing.get_context("spawn")
    with _environment(environment), ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_child_build, out, spec).result()


def _build(out: Path, spec: ToyBuildSpec, capability: str, log) -> dict:
    start = time.perf_counter()
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    train, test, val = task.make_splits(spec.seed, n_train=spec.n_train, n_test=spec.n_test,
                                        n_val=spec.n_val)
    for name, problems in (("train", train), ("test", test), ("val", val)):
        task.write_jsonl(staging / "data" / f"{name}.jsonl", problems)
    log(f"data: {len(train)} train, {len(test)} held-out test, {len(val)} validation problems")
    tokenizer = build_tokenizer()
    train_ids = encode(tokenizer, train)

    teacher, t_result = _train_teacher(spec, tokenizer, train_ids, val, log)
    t_metrics = _measure(teacher, tokenizer, test, spec, seed=spec.seed * 7919 + 11)
    log(f"[teacher] held-out: greedy {t_metrics['test_greedy_accuracy']:.3f}, sampled "
        f"{t_metrics['test_sampled_accuracy']:.3f}")
    _save_model(teacher, tokenizer, staging / "teacher")

    student, s_result = _train_student(spec, tokenizer, train_ids, val, log)
    s_metrics = _measure(student, tokenizer, test, spec, seed=spec.seed * 7919 + 13)
    log(f"[student] held-out: greedy {s_metrics['test_greedy_accuracy']:.3f}, sampled "
        f"{s_metrics['test_sampled_accuracy']:.3f} (snapshot at step {s_result['steps']})")
    _save_model(student, tokenizer, staging / "student")

    import tokenizers
    import transformers

    def model_entry(path, size, model, result, metrics):
        return {"path": path, "size": size_dict(size, model), "steps": result["steps"],
                "train_seconds": round(result["seconds"], 1),
                "final_loss": result["losses"][-1], "loss_curve": result["losses"],
                "history": result["history"], **metrics}

    manifest = {
        "build": spec.key(capability),
        "task": {"name": "4-digit addition with a carry scratchpad (character level)",
                 "example": task.make_problem(3472, 2859),
                 "prompt_tokens": PROMPT_TOKENS, "response_tokens": RESPONSE_TOKENS,
                 "answer_check": "trb_megatron.toy.task.is_correct(response, answer)",
                 "prompt_encoding": "tokenizer(prompt).input_ids (prepends <bos>)"},
        "tokenizer": {"vocab_size": len(tokenizer), **special_ids(tokenizer)},
        "data": {"train": "data/train.jsonl", "test": "data/test.jsonl",
                 "val": "data/val.jsonl", "n_train": len(train), "n_test": len(test),
                 "n_val": len(val)},
        "teacher": model_entry("teacher", spec.teacher, teacher, t_result, t_metrics),
        "student": {**model_entry("student", spec.student, student, s_result, s_metrics),
                    "target_reached": s_result["target_reached"]},
        "evaluation": {"decoding": "own KV-cache loop; greedy and exact temperature sampling "
                                   "(no top-k/top-p); a response counts only if it ends in EOS",
                       "sampled_temperature": spec.sampled_temperature},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
    log(f"wrote {out} in {manifest['build_seconds']:.0f}s")
    return {**manifest, "reused": False}
