"""Run a test body on several real gloo processes.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, initialises a gloo
process group over loopback in each, calls `fn(rank, world_size, *args)` and re-raises the first
failure (with the child's traceback) in the parent. `fn` must be a module-level function so the
spawned children can import it; put several checks in one body, a launch costs seconds.
"""

import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        # One thread per process: 4 processes share 2 cores.
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=5)
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, *args):
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
