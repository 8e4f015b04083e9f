"""Which models have a worker idle for longer than the grace period (the reconciler then resends
their queued jobs sent longer ago than that: a worker with room takes whatever its queues hold)."""

import time

from api.reconciler import _idle_models
from core.queue import WorkerBeat


def beat(model: str, idle_since: float | None) -> WorkerBeat:
    now = time.time()
    return WorkerBeat(f"{model}@h-1", model, "h", 1, now, now, idle_since=idle_since)


def test_only_workers_idle_past_the_grace_period_count() -> None:
    now = time.time()
    beats = [
        beat("a", now - 60),
        beat("a", now - 20),
        beat("a", None),  # busy
        beat("b", now - 2),  # idle, but not for long
        beat("c", None),
    ]
    assert _idle_models(beats, grace=5) == {"a"}


def test_a_beat_from_an_older_worker_without_the_field_reads_as_busy() -> None:
    old = WorkerBeat.loads(
        '{"worker_id": "w", "model": "a", "hostname": "h", "pid": 1, '
        '"started_at": 1.0, "seen_at": 1.0}'
    )
    assert old.idle_since is None
    assert _idle_models([old], grace=5) == set()


def test_a_beat_from_a_newer_worker_with_more_fields_still_reads() -> None:
    newer = WorkerBeat.loads(
        '{"worker_id": "w", "model": "a", "hostname": "h", "pid": 1, '
        '"started_at": 1.0, "seen_at": 1.0, "idle_since": 1.0, "more": 2}'
    )
    assert newer.idle_since == 1.0
