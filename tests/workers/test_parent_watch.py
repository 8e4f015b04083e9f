"""The reaper kills what a worker leaves when it is killed outright."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench.stack import ROOT, wait_gone
from workers.parent_watch import WORKER_PID_ENV

pytestmark = pytest.mark.services  # it starts processes

# A stand-in for a worker: a child of its own (as an engine core) that would outlive it.
WORKER = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
    "time.sleep(600)"
)


def test_the_reaper_kills_what_a_killed_worker_left() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER])
    reaper = subprocess.Popen(
        [sys.executable, "-m", "workers.parent_watch", str(worker.pid)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 10
        while not (left := psutil.Process(worker.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left, "the stand-in's child did not start"
        time.sleep(1)  # the reaper has noted it
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert not wait_gone(left, timeout=10)
        assert reaper.wait(10) == 0
    finally:
        for proc in (worker, reaper):
            if proc.poll() is None:
                proc.kill()


def test_the_reaper_kills_what_carries_the_workers_mark_whoever_its_parent() -> None:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    reaper = subprocess.Popen(
        [sys.executable, "-m", "workers.parent_watch", str(worker.pid)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Not the worker's child (as a model runner re-parented to PID 1), but marked as its engine's.
    marked = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, WORKER_PID_ENV: str(worker.pid)},
    )
    # The same, marked for another worker: not the reaper's.
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, WORKER_PID_ENV: str(os.getpid())},
    )
    try:
        time.sleep(1)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert marked.wait(10) == -signal.SIGKILL
        assert reaper.wait(10) == 0
        assert f"(pid {marked.pid})" in reaper.stderr.read()
        assert other.poll() is None
    finally:
        for proc in (worker, reaper, marked, other):
            if proc.poll() is None:
                proc.kill()
