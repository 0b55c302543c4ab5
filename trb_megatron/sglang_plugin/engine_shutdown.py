"""Shut an offline sglang.Engine down without killing the other children of the process that
started it.

sglang 0.5.23's Engine.shutdown() ends with kill_process_tree(os.getpid(), include_parent=False):
it SIGKILLs EVERY descendant of the calling process, not only the engine's scheduler and
detokenizer processes. Inside a trainer that is whatever else the trainer started: Megatron's
checkpoint workers, data-loader or compile workers. Found by running the teacher-off restart
(the engine is shut down mid-run): the next checkpoint save hung forever. `shutdown_engine`
runs Engine.shutdown() with that one call narrowed to the engine's own processes
(Engine.get_all_child_pids() and their descendants); everything else Engine.shutdown() does
(watchdog, sockets, transports) is unchanged. Test: tests/sglang/test_engine.py.
"""

import os


def shutdown_engine(engine) -> None:
    """engine.shutdown(), killing only the engine's processes (see the module docstring)."""
    from sglang.srt.entrypoints import engine as engine_module

    kill_process_tree = engine_module.kill_process_tree
    own = list(engine.get_all_child_pids())
    caller = os.getpid()

    def kill_engine_processes(parent_pid, include_parent=True, skip_pid=None,
                              wait_timeout=60):
        if parent_pid != caller or include_parent:
            return kill_process_tree(parent_pid, include_parent, skip_pid, wait_timeout)
        for pid in own:
            kill_process_tree(pid, include_parent=True, skip_pid=skip_pid,
                              wait_timeout=wait_timeout)
        return None

    engine_module.kill_process_tree = kill_engine_processes
    try:
        engine.shutdown()
    finally:
        engine_module.kill_process_tree = kill_process_tree
