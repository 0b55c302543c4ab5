"""Command-line entry of the distillation job: the only module that reads argv and the
environment. examples/run_trb_distill.sh calls `main` once with CHECK_ONLY=1 before it starts
torchrun (config errors, missing paths and the layout checks of DRY_RUN exit with code 2
there), then on every rank; or once with DRY_RUN=1.

    CONFIG=examples/configs/toy_cpu.yaml python examples/run_trb_distill.sh [key=value ...]
"""

import os
import sys
from pathlib import Path

from trb_megatron.config import load_config, missing_paths

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ROOT / "examples" / "configs" / "archs"
DEFAULT_CONFIG = ROOT / "examples" / "configs" / "toy_cpu.yaml"
ROLES = ("student", "teacher")


def check_job(config) -> None:
    """What the job needs beyond a valid Config (the Trainer API takes prompts directly)."""
    if config.data is None:
        raise ValueError("the job needs a data section with its training prompts: set "
                         "data.path_or_name (and data.prompt_field) in the config or as an "
                         "override, e.g. data.path_or_name=prompts.jsonl")


def dry_run(config, nnodes: int, nproc_per_node: int) -> str:
    """Validate config and layout for nnodes x nproc_per_node ranks; return the plan text.
    Paths missing on this machine are listed, not rejected, while the layout can still be
    checked: models through their published architecture (examples/configs/archs/), toy models
    once the run has built them."""
    from trb_megatron.models.arch import ModelArch
    from trb_megatron.training.trainer import check_layout

    world = nnodes * nproc_per_node
    missing = missing_paths(config)
    toy_pending = [r for r in ROLES if f"model.{r}" not in missing
                   and not Path(getattr(config.model, r)).exists()]
    for role in ROLES:
        if f"model.{role}" in missing:
            try:
                ModelArch.of_model_dir(getattr(config.model, role), ARCHS)
            except ValueError:
                raise ValueError(f"{missing[f'model.{role}']} (and {ARCHS.relative_to(ROOT)}/ "
                                 "has no published architecture of that name to check the layout "
                                 "with)") from None
    dp = check_layout(config, world, ARCHS, models=[r for r in ROLES if r not in toy_pending])
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    share = config.train.prompts_per_step // dp
    rows = share * config.rollout.samples_per_prompt
    lines = [f"plan: {nnodes} node(s) x {nproc_per_node} ranks = {world}: TP={tp} x PP={pp} x "
             f"DP={dp}", f"  per step: {config.train.prompts_per_step} prompts ({share} per "
             f"DP rank) x {config.rollout.samples_per_prompt} samples = {rows} rollouts per "
             f"DP rank, {-(-rows // config.train.micro_batch_size)} microbatches of "
             f"{config.train.micro_batch_size}"]
    if toy_pending:
        lines.append(f"  models: the toy models are built into {config.toy.out_dir} when the "
                     "run starts (their layout checks run then)")
    for role in (r for r in ROLES if r not in toy_pending):
        path = getattr(config.model, role)
        arch = ModelArch.of_model_dir(path, ARCHS)
        lines.append(f"  {role}: {path} ({arch.family}, {arch.num_layers} layers, hidden "
                     f"{arch.hidden_size}, {arch.num_heads} heads / {arch.num_kv_heads} KV, "
                     f"vocab {arch.vocab_size} padded to {arch.padded_vocab_size}; "
                     f"{arch.num_layers // pp} layers per stage)")
    f8 = config.fp8
    if f8.enabled:
        lines.append(f"  fp8: {f8.format}, recipe {f8.recipe}, amax history "
                     f"{f8.amax_history_len} ({f8.amax_compute_algo}), margin {f8.margin}, bf16 "
                     f"layers {f8.bf16_layers_at_start} first / {f8.bf16_layers_at_end} last, "
                     f"{'student and teacher' if f8.teacher else 'student only'} (needs "
                     "Transformer Engine on the GPUs)")
    lines += [f"  method {config.build_method().describe()}",
              f"  {config.train.steps} steps, lr {config.optim.lr}, run dir {config.train.run_dir}"]
    if missing:
        lines.append("  not on this machine (a run started here stops on them with code 2): "
                     + "; ".join(missing.values()))
    lines.append("layout OK")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_path = os.environ.get("CONFIG") or str(DEFAULT_CONFIG)
    try:
        config = load_config(config_path, argv)
        check_job(config)
        if os.environ.get("DRY_RUN") == "1":
            print(dry_run(config, int(os.environ.get("NNODES", "1")),
                          int(os.environ.get("NPROC_PER_NODE", "1"))))
            return 0
        missing = missing_paths(config)
        if missing:
            raise ValueError("; ".join(missing.values()))
        if os.environ.get("CHECK_ONLY") == "1":  # the plan's layout checks, nothing printed
            dry_run(config, int(os.environ.get("NNODES", "1")),
                    int(os.environ.get("NPROC_PER_NODE", "1")))
            return 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from trb_megatron.job import run_job

    return run_job(config)
