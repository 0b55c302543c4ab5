"""Run a test body on several real gloo processes (one thread each: 4 processes share 2 cores).

`run_distributed(fn, world_size, *args)` calls `fn(rank, world_size, *args)` in every process and
re-raises the first failure with the child's traceback. `fn` must be a module-level function so
the spawned children can import it; put several checks in one body, a launch costs seconds.
`free_port()` gives a loopback port for tests that start torchrun themselves.
"""

import socket

from trb_megatron.parallel.local_launch import spawn_local


def free_port() -> str:
    """A TCP port free on loopback right now (MASTER_PORT or a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_distributed(fn, world_size, *args):
    spawn_local(fn, world_size, *args, threads=1)
