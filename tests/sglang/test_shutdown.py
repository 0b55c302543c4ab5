"""Shutting an offline SGLang engine down spares the other child processes of the caller (a
trainer's checkpoint workers): sglang 0.5.23's Engine.shutdown() kills them all.

Run: .venv/bin/python -m pytest tests/sglang/test_shutdown.py -q   (2 engine starts)
Its own module: the upstream shutdown it demonstrates kills every child of the test process,
so no other engine may be running.
"""

import multiprocessing
import os

from tests.sglang.conftest import start_engine
from trb_megatron.sglang_plugin.engine_shutdown import shutdown_engine


def _sleep():
    import time

    time.sleep(600)


def test_shutdown_spares_the_callers_other_children(models):
    """Engine.shutdown() SIGKILLs every child of the calling process (sglang 0.5.23);
    shutdown_engine kills only the engine's own processes."""
    bystander = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    bystander.start()
    try:
        engine = start_engine(models, teacher=False)
        engine_pids = engine.get_all_child_pids()
        shutdown_engine(engine)
        assert bystander.is_alive()
        assert not any(_alive(pid) for pid in engine_pids)
        engine = start_engine(models, teacher=False)
        engine.shutdown()  # upstream
        bystander.join(timeout=30)
        assert not bystander.is_alive() and bystander.exitcode == -9
    finally:
        if bystander.is_alive():
            bystander.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


