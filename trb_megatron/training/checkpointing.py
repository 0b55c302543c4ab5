"""Atomic, resumable training checkpoints.

    RUN/checkpoints/step_000004/     model/ (Megatron distributed checkpoint: model, optimizer,
                                     trainer state), hf/ (the student's config and tokenizer, so
                                     tools/convert_hf.py megatron-to-hf exports it directly),
                                     trb_checkpoint.json
    RUN/checkpoints/latest           name of the newest complete checkpoint

A checkpoint is written to step_N.partial and renamed when complete; `latest` is replaced
atomically afterwards. A crash or kill at any moment leaves the previous checkpoint loadable.
"""

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from trb_megatron.checkpoint.convert import FORMAT_VERSION, META, read_meta
from trb_megatron.checkpoint.writer import save_distributed

LATEST = "latest"
# The default fully_sharded_model_space format fails on save in megatron-core 0.16.1.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _state(ddp, optimizer, trainer_state, is_loading):
    model = ddp.module.sharded_state_dict()
    return {"model": model,
            "optimizer": optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                      metadata=_OPTIMIZER_METADATA),
            "trainer": trainer_state}


def save_checkpoint(run_dir, step: int, ddp, optimizer, trainer_state: dict, student_dir,
                    keep: int) -> Path:
    """Collective. Writes checkpoints/step_{step}, points `latest` at it, prunes old ones."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    stage = root / f"step_{step:06d}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "model").mkdir(parents=True)
    dist.barrier()
    save_distributed(_state(ddp, optimizer, trainer_state, False), str(stage / "model"))
    dist.barrier()
    if dist.get_rank() == 0:
        source = read_meta(student_dir)
        shutil.copytree(Path(student_dir) / "hf", stage / "hf")
        meta = {"format_version": FORMAT_VERSION, "params_dtype": source["params_dtype"],
                "source": source["source"], "step": step}
        (stage / META).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(stage, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("step_??????"))[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def latest_checkpoint(run_dir) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / META).is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path, ddp, optimizer) -> dict:
    """Collective. Restores model and optimizer in place; returns the trainer state."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_state(ddp, optimizer, None, True), str(Path(path) / "model"))
    ddp.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    return loaded["trainer"]
