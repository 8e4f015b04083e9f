"""Processes that parse batch input files for an API process: a 100 MB file is parsed off its
event loop and out of its GIL, at a lower CPU priority than its own.

Only the standard library here: a parsing process imports this module before it lowers its
priority, and what the work needs (api.batches.lines) only after.
"""

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class Parsers:
    """A pool of `size` parsing processes, started when first needed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in one of the processes."""
        # Submitting may start a process, a fork and exec that can take a loaded host a few
        # hundred milliseconds: not on the event loop.
        future: Future[T] = await anyio.to_thread.run_sync(self._submit, fn, args)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            with self._lock:
                self._pool = None  # a process died (killed, out of memory): new ones next time
            raise

    def _submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> "Future[T]":
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.size,
                    # Not forked: a copy of a process with running threads may copy held locks.
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start,
                )
            return self._pool.submit(fn, *args)


def _start() -> None:
    """A parsing process: it yields the CPU to the API's own work, and ends with the API."""
    os.nice(10)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent,), daemon=True).start()


def _end_with(parent: BaseProcess) -> None:
    # A killed API, or one that re-raises SIGTERM as uvicorn does, shuts no pool down itself.
    parent.join()
    os._exit(0)
