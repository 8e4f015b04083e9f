"""Every process of a worker's engine dies with the process that started it.

vLLM runs its engine core (and, under it, its model runners) in processes of their own. When a
worker's main process is killed outright (`kill -9`, the OOM killer), nothing tells them: they
were seen running on for minutes, re-parented to PID 1, holding the GPU's memory, so the worker's
replacement could not load. This module is a vLLM general plugin (entry point group
`vllm.general_plugins`), which vLLM loads at the start of each of those processes; in a process
a Ferry worker's engine started, it asks the kernel to kill the process when its parent dies.

On a loaded host a model runner was still seen outliving its worker that way, so the worker also
starts a reaper (`python -m workers.parent_watch PID`): a small process that notes the worker's
descendants every half second and, once the worker is gone, kills every one of them still there,
and every process that carries the worker's mark (FERRY_WORKER_PID, which each process of the
engine inherits), whoever its parent has become.
"""

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

# Set by the worker before it starts its engine: the plugin acts only under a Ferry worker.
WORKER_PID_ENV = "FERRY_WORKER_PID"
PR_SET_PDEATHSIG = 1
# The worker's reaper (one a process), kept so that it is not taken for garbage while it runs.
_reaper: subprocess.Popen | None = None


def mark_worker() -> None:
    """Called in a worker's main process before it starts the engine: its engine's processes
    will die with it."""
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    global _reaper
    if _reaper is None:
        _reaper = subprocess.Popen(
            [sys.executable, "-m", "workers.parent_watch", str(os.getpid())],
            stdin=subprocess.DEVNULL,
        )


def reap_after(worker_pid: int, every: float = 0.5) -> list[str]:
    """Wait for the worker to end (or become a zombie); then kill every process its engine left:
    those it was seen to have started, and any other that carries its mark in the environment
    (FERRY_WORKER_PID, inherited by every process the engine starts, however deep and whoever
    its parent is by then). Names what it killed."""
    import psutil

    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        worker = psutil.Process(worker_pid)
        started = worker.create_time()
        while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.Error):
                seen.update((p.pid, p) for p in worker.children(recursive=True) if p.pid != me)
            time.sleep(every)
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                marked = process.environ().get(WORKER_PID_ENV) == str(worker_pid)
                if marked and process.pid != me and process.create_time() >= started:
                    seen.setdefault(process.pid, process)
    killed = []
    for process in seen.values():
        # is_running() also tells a process from a later one given the same id.
        with contextlib.suppress(psutil.Error):
            if process.is_running():
                name = f"{process.name()} (pid {process.pid})"
                process.kill()
                killed.append(name)
    return killed


def exit_with_parent() -> None:
    """vLLM plugin entry point: in a child of a Ferry worker's engine, die with the parent."""
    parent = multiprocessing.parent_process()
    if WORKER_PID_ENV not in os.environ or parent is None:
        return
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # And a watch besides: the kernel's signal answers the end of the parent's thread that
    # started this process (prctl(2)), and on a loaded host a model runner was once seen
    # outliving its engine core.
    threading.Thread(target=_watch, args=(parent.pid,), name="parent-watch", daemon=True).start()
    # The parent may have died before the kernel was told.
    if os.getppid() != parent.pid:
        os._exit(1)


def _watch(parent_pid: int | None) -> None:
    """Look for the parent every second; once it is gone, die."""
    while os.getppid() == parent_pid:
        threading.Event().wait(1)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    # Ctrl-C in a terminal and a supervisor's SIGTERM reach the worker's whole process group: the
    # reaper outlasts the worker's own shutdown, and ends within `every` seconds of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if left := reap_after(int(sys.argv[1])):
        print(
            f"worker {sys.argv[1]} ended; killed what its engine left: {', '.join(left)}",
            file=sys.stderr,
            flush=True,
        )
