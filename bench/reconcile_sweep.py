"""A reconciler sweep's time with 100,000 jobs queued (sent to Redis, no worker consuming).

Run: `.venv/bin/python -m bench.reconcile_sweep`. It creates its own database (migrated to head)
and uses its own Redis database number, inserts the jobs, sends them as the API does (Celery, to
Redis), then times sweeps; no API process and no worker are started: the sweep runs in this
process, as an API process runs it. When the reconciler read every queue whole on each sweep
(before jobs recorded their dispatch), a sweep took about 2 s at 100,000 queued.
"""

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from api.context import ApiContext
from api.reconciler import Reconciler
from api.waiter import JobWaiter
from bench.stack import Stack, scratch_database
from core.queue import Dispatch, dispatch_async, make_celery
from core.settings import ApiSettings

MODEL = "bench-sweep-model"
# Queued an hour ago: every job is past the reconciler's grace period, as in a long queue.
FILL = text(
    """
    INSERT INTO jobs (id, project, api_key_id, model, status, request, store, attempts, created,
                      created_at, queued_at)
    SELECT 'chatcmpl-sweep' || g, k.project, k.id, CAST(:model AS text), 'queued',
           jsonb_build_object('model', CAST(:model AS text), 'messages',
                              jsonb_build_array(jsonb_build_object('role', 'user',
                                                                   'content', 'hi ' || g))),
           false, 0, extract(epoch from now())::bigint,
           now() - interval '1 hour', now() - interval '1 hour'
    FROM (SELECT project, id FROM api_keys LIMIT 1) AS k,
         generate_series(1, CAST(:count AS int)) AS g
    """
)


async def sweeps(
    stack: Stack, fill: Callable[[], list[str]], vacuum: Callable[[], None], rounds: int
) -> list[float]:
    """Sweep once (as a running system has: its mark is in Redis), fill the queue by `fill` (the
    ids it inserted) and the API's send, `vacuum`, then time `rounds` sweeps."""
    settings = ApiSettings(database_url=stack.database_url, redis_url=stack.redis_url)
    engine = create_async_engine(stack.database_url)
    redis = aioredis.Redis.from_url(stack.redis_url)
    celery = make_celery(settings, "bench")
    ctx = ApiContext(
        settings=settings,
        engine=engine,
        sessions=async_sessionmaker(engine, expire_on_commit=False),
        redis=redis,
        celery=celery,
        waiter=JobWaiter(redis),
    )
    try:
        reconciler = Reconciler(ctx)
        await reconciler.sweep()
        ids = await asyncio.to_thread(fill)
        started = time.perf_counter()
        await dispatch_async(celery, ctx.sessions, [Dispatch(job_id, MODEL) for job_id in ids])
        print(f"sent {len(ids):,} messages ({time.perf_counter() - started:.0f} s)")
        await asyncio.to_thread(vacuum)
        samples = []
        for _ in range(rounds + 1):
            started = time.perf_counter()
            done = await reconciler.sweep()
            samples.append(time.perf_counter() - started)
            assert not done.resent, f"{len(done.resent)} jobs resent: none was lost"
        return samples[1:]  # the first warms the connections and caches
    finally:
        await redis.aclose()
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    with scratch_database("ferry_bench_sweep", 12) as (stack, db, _):

        def fill() -> list[str]:
            with db.begin() as conn:
                conn.execute(FILL, {"model": MODEL, "count": args.jobs})
                return list(conn.execute(text("SELECT id FROM jobs ORDER BY id")).scalars())

        def vacuum() -> None:
            with db.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                    text("VACUUM ANALYZE jobs")
                )

        samples = asyncio.run(sweeps(stack, fill, vacuum, args.rounds))
    print(
        f"reconciler sweep, {args.jobs:,} jobs queued: median "
        f"{statistics.median(samples) * 1000:.1f} ms over {len(samples)} sweeps "
        f"(min {min(samples) * 1000:.1f}, max {max(samples) * 1000:.1f})"
    )


if __name__ == "__main__":
    main()
