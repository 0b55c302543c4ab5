"""Run a function on N local processes joined in one torch.distributed group (no torchrun).

For command-line tools and tests on a single machine: `spawn_local(fn, world_size, *args)` starts
`world_size` processes, gives them a loopback rendezvous and the profile's backend (gloo on CPU),
calls `fn(rank, world_size, *args)` in each and re-raises the first failure (with the child's
traceback) in the parent; the other processes are terminated. `fn` must be importable
(module-level). Under torchrun the entry point runs `fn` directly instead.
"""

import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from trb_megatron.parallel.profile import detect_profile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, threads, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch

    torch.set_num_threads(threads)
    dist.init_process_group(detect_profile().distributed_backend, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=10))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_local(fn, world_size: int, *args, threads: int | None = None) -> None:
    """Run fn(rank, world_size, *args) on world_size local processes; raise on any failure."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    mp.spawn(_worker, args=(world_size, _free_port(), threads, fn, args), nprocs=world_size,
             join=True)
