"""Every process of a worker's engine dies with the process that started it.

vLLM runs its engine core (and, under it, its model runners) in processes of their own. When a
worker's main process is killed outright (`kill -9`, the OOM killer), nothing tells them: they
were seen running on for minutes, re-parented to PID 1, holding the GPU's memory, so the worker's
replacement could not load. This module is a vLLM general plugin (entry point group
`vllm.general_plugins`), which vLLM loads at the start of each of those processes; in a process
a Ferry worker's engine started, it asks the kernel to kill the process when its parent dies.
"""

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading

# Set by the worker before it starts its engine: the plugin acts only under a Ferry worker.
WORKER_PID_ENV = "FERRY_WORKER_PID"
PR_SET_PDEATHSIG = 1


def mark_worker() -> None:
    """Called in a worker's main process before it starts the engine."""
    os.environ[WORKER_PID_ENV] = str(os.getpid())


def exit_with_parent() -> None:
    """vLLM plugin entry point: in a child of a Ferry worker's engine, die with the parent."""
    parent = multiprocessing.parent_process()
    if WORKER_PID_ENV not in os.environ or parent is None:
        return
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(
            target=_watch, args=(parent.pid,), name="parent-watch", daemon=True
        ).start()
    # The parent may have died before the kernel was told.
    if os.getppid() != parent.pid:
        os._exit(1)


def _watch(parent_pid: int | None) -> None:
    """Where the kernel cannot be asked: look for the parent every second."""
    while os.getppid() == parent_pid:
        threading.Event().wait(1)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGKILL)
