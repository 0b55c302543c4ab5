"""The one way the product saves a Megatron distributed checkpoint: `save_distributed`.

dist_checkpointing's writer (strategies.filesystem_async) reports its results through a
multiprocessing Manager: a server process it starts at the first save and keeps for the life of
the process. Slurm signals every process of a job step (preemption, `scontrol requeue`, the
time-limit signal that examples/slurm/trb_distill.sbatch passes on), and SIGTERM killed that
server, so the checkpoint the trainer writes on the signal failed with BrokenPipeError (seen on
the local Slurm cluster of tests/distributed/test_slurm.py). `start_checkpoint_writer` starts the
same Manager (spawned, as upstream does) with SIGTERM ignored in its process and hands upstream
its queue; the calling process keeps its own SIGTERM handler, and the server still exits with
its owner. Every save of the product (training checkpoints, HF -> Megatron conversion) goes
through `save_distributed`, so the server is always started this way.
"""

import multiprocessing
import signal


def start_checkpoint_writer() -> None:
    """Start megatron-core's checkpoint-writer helper process immune to SIGTERM; does nothing
    once the writer's queue exists (also one that upstream started)."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_IGN))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def save_distributed(sharded_state_dict: dict, directory: str) -> None:
    """Collective: dist_checkpointing.save with the writer started by start_checkpoint_writer."""
    from megatron.core import dist_checkpointing

    start_checkpoint_writer()
    dist_checkpointing.save(sharded_state_dict, directory)
