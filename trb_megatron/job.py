"""The distillation job behind examples/run_trb_distill.sh, on every rank of a torchrun launch:

    [toy build (rank 0, cached)] -> HF -> Megatron conversion of student and teacher (cached in
    RUN/converted) -> prompts -> [teacher and student accuracy] -> Trainer.run() (periodic
    evaluation) -> [student accuracy] -> summary printed by rank 0 and written to RUN/summary.json
"""

import dataclasses
import json
import time
from pathlib import Path

import torch.distributed as dist

from trb_megatron.checkpoint.convert import META, hf_to_megatron, source_fingerprint
from trb_megatron.config import Config
from trb_megatron.data import load_prompts, load_tokenizer, tokenizer_path
from trb_megatron.parallel import detect_profile


def _megatron_dir(path, converted: Path) -> str:
    """A Megatron checkpoint for `path`: itself, or its conversion (made once, collectively)."""
    path = Path(path)
    if (path / META).is_file():
        return str(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither a Megatron checkpoint ({META}) nor a Hugging Face "
                         "model directory (config.json)")
    done = converted / META
    meta = json.loads(done.read_text()) if done.is_file() else {}
    if (meta.get("source"), meta.get("source_fingerprint")) != (str(path.resolve()),
                                                               source_fingerprint(path)):
        hf_to_megatron(path, converted, overwrite=True, progress=dist.get_rank() == 0)
    return str(converted)


def _warmup_summary(metrics_path: Path) -> dict:
    """Over the steps whose rollouts blended (eps > 0): mean beta and the worst realised
    KL(mu || pi_S) - eps (None without such steps: opd, tropd)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    warm = [r for r in records if r["eps"] > 0]
    return {
        "steps": len(records),
        "beta_mean_during_warmup": (sum(r["beta_mean"] for r in warm) / len(warm)
                                    if warm else None),
        "max_kl_minus_eps": max((r["kl_to_student_max"] - r["eps"] for r in warm), default=None),
        "final_loss": records[-1]["loss"] if records else None,
    }


def run_job(config: Config) -> int:
    """Run the whole job; returns the process exit code (0: done or preempted-and-saved)."""
    from trb_megatron.eval.pass1 import evaluate_pass1
    from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine
    from trb_megatron.training.trainer import Trainer

    start = time.perf_counter()
    if config.data is None:
        raise ValueError("the job needs a data section (training prompts)")
    if not dist.is_initialized():
        dist.init_process_group(detect_profile().distributed_backend)
    rank0 = dist.get_rank() == 0
    run_dir = Path(config.train.run_dir)
    if config.toy is not None:
        if rank0:  # the other ranks wait; the build runs in its own pinned process
            from trb_megatron.toy.build import ToyBuildSpec, build_pinned

            build_pinned(config.toy.out_dir, ToyBuildSpec(seed=config.toy.seed))
        dist.barrier()
    model = dataclasses.replace(
        config.model,
        student=_megatron_dir(config.model.student, run_dir / "converted" / "student"),
        teacher=_megatron_dir(config.model.teacher, run_dir / "converted" / "teacher"))
    config = dataclasses.replace(config, model=model)
    prompts = load_prompts(config.data, tokenizer_path(model.student))
    if rank0:
        print(f"prompts: {len(prompts)} kept of {prompts.loaded} "
              f"({prompts.dropped_too_long} dropped as longer than "
              f"{config.data.max_prompt_tokens} tokens)", flush=True)
    evaluate = None
    results = {}
    if config.eval is not None:
        test_set = load_prompts(config.eval.data, tokenizer_path(model.student), key="eval.data")
        tokenizer = load_tokenizer(tokenizer_path(model.student))

        def accuracy(engine, step=0):
            return evaluate_pass1(engine, test_set, tokenizer, samples=config.eval.samples,
                                  max_new_tokens=config.eval.max_new_tokens,
                                  seed=config.train.seed + step, verifier=config.eval.verifier,
                                  temperature=config.eval.temperature,
                                  dp_group=trainer.groups.dp).pass1

        by_step = {}  # the in-training evaluation at the last step is the final one

        def evaluate(step):
            by_step[step] = accuracy(trainer.engine, step)
            return {"eval/accuracy": by_step[step]}

    trainer = Trainer(config, prompts.token_ids, evaluate=evaluate)
    try:
        if config.eval is not None and config.eval.before_training and trainer.step == 0:
            teacher_engine = MegatronRolloutEngine(
                trainer.teacher, None, trainer.groups, vocab=trainer.vocab,
                pad_id=trainer.engine.pad_id)
            results["teacher_accuracy"] = accuracy(teacher_engine)
            results["student_accuracy_before"] = accuracy(trainer.engine)
            if rank0:
                print(f"before training: teacher {results['teacher_accuracy']:.3f}, "
                      f"student {results['student_accuracy_before']:.3f} (pass@1, "
                      f"{config.eval.samples} samples x {len(test_set)} problems)", flush=True)
        status = trainer.run()
        if config.eval is not None and status == "done":
            if trainer.step not in by_step:
                trainer.engine.sync_weights()
                by_step[trainer.step] = accuracy(trainer.engine, trainer.step)
            results["student_accuracy_after"] = by_step[trainer.step]
    finally:
        trainer.close()
    if rank0:
        results.update(_warmup_summary(run_dir / "metrics.jsonl"), status=status,
                       method=config.build_method().describe(),
                       wall_time_s=round(time.perf_counter() - start, 1))
        (run_dir / "summary.json").write_text(json.dumps(results, indent=2))
        print("summary:\n" + "\n".join(f"  {k}: {v}" for k, v in results.items()), flush=True)
        if status == "preempted":
            print("preempted: a checkpoint was written; run the same command to resume")
    dist.barrier()
    dist.destroy_process_group()
    return 0
