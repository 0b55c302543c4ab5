"""The checkpoint writer survives a preemption's SIGTERM (trb_megatron/checkpoint/writer.py,
which every save of the product goes through): megatron-core's dist_checkpointing writer reports through a multiprocessing Manager server that
SIGTERM kills, so the checkpoint the trainer writes on Slurm's signal failed (BrokenPipeError);
started by the product, the server ignores SIGTERM and still exits with its owner. End to end on
a Slurm cluster: tests/distributed/test_slurm.py.

Run: .venv/bin/python -m pytest tests/unit/test_checkpoint_writer.py -q
When a megatron-core upgrade changes how its writer reports, the "upstream" case tells.
"""

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.megatron  # megatron-core's writer internals differ between releases

ROOT = Path(__file__).resolve().parents[2]
# In a fresh process (the writer's queue is process-wide): start the queue a save would use, the
# product's way or upstream's, SIGTERM its server as Slurm does, then use the queue as a save does.
PROBE = """
import os, signal, sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
if sys.argv[1] == "product":
    from trb_megatron.checkpoint.writer import start_checkpoint_writer
    start_checkpoint_writer()
    start_checkpoint_writer()  # idempotent: the same server
# the queue a save asks for (renamed get_write_results_queue in megatron-core 0.19)
get_queue = getattr(filesystem_async, "get_write_results_queue", None) or \
    filesystem_async._get_write_results_queue
queue = get_queue()
server = queue._manager._process.pid
print(server, flush=True)
os.kill(server, signal.SIGTERM)
time.sleep(0.5)
try:
    queue.put("written")
    print(queue.get())
except (OSError, EOFError) as err:
    print(type(err).__name__)
"""


def _probe(mode: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    server, result = done.stdout.split()
    return int(server), result


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode, result", [("upstream", "ConnectionRefusedError"),
                                          ("product", "written")])
def test_writer_queue_survives_sigterm(mode, result):
    server, got = _probe(mode)
    assert got == result
    deadline = time.monotonic() + 10  # and the server does not outlive its owner
    while not _gone(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(server), f"the writer's server {server} outlived its process"
