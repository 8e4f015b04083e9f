"""What the queue itself costs: the API, Postgres and Celery, with the engine out of the picture.

Workers run the fake engine (`FERRY_ENGINE=fake`): it holds max_num_seqs requests at once and
answers each after a fixed delay, so every figure here is Ferry's own overhead or capacity.

    python -m bench.queue_overhead

1. Synchronous jobs/s: many clients at once, engine delay 0; and the added latency of one
   request at a time.
2. Scaling: one batch run by 1, 2, then 4 workers, each able to finish
   max_num_seqs / delay jobs/s; jobs/s with N workers over jobs/s with one (target >= 3.5x).
3. Per-job cost at 1k, 10k and 100k jobs in a batch (upload to completed, engine delay 0, two
   workers): flat means the 100k batch costs <= 110x the 1k one.
"""

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai
from sqlalchemy import create_engine, text

from bench.stack import Stack, batch_line, run_batch

MODEL = "fake-model"


def line(i: int) -> dict:
    return batch_line(f"r{i}", MODEL, f"Request {i}")


def start_workers(stack: Stack, count: int, first: int, seqs: int, delay: float) -> None:
    for i in range(first, first + count):
        stack.start_worker(
            f"fake-worker-{i}",
            "--model",
            MODEL,
            FERRY_ENGINE="fake",
            FERRY_MAX_NUM_SEQS=str(seqs),
            FERRY_FAKE_ENGINE_DELAY_SECONDS=str(delay),
        )
    stack.wait_for_workers(first + count, timeout=60)


def stop_workers(stack: Stack) -> None:
    """Stop every worker, keep the API."""
    api = [p for p in stack.processes if "api" in p.args]
    for proc in stack.processes:
        if proc not in api:
            proc.terminate()
    for proc in stack.processes:
        if proc not in api:
            proc.wait(60)
    stack.processes[:] = api
    import redis

    from core.queue import WORKERS_KEY

    redis.Redis.from_url(stack.redis_url).delete(WORKERS_KEY)


def sync_rate(client: openai.OpenAI, total: int, concurrency: int) -> float:
    def ask(i: int) -> None:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8
        )

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(ask, range(concurrency)))  # warm-up
        started = time.perf_counter()
        list(pool.map(ask, range(total)))
    return total / (time.perf_counter() - started)


def one_at_a_time(client: openai.OpenAI, rounds: int) -> float:
    """Median seconds of one request with an engine that answers at once."""
    seconds = []
    for i in range(rounds):
        started = time.perf_counter()
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8
        )
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def batch_rate(stack: Stack, client: openai.OpenAI, jobs: int) -> tuple[float, int]:
    """Jobs/s of a batch while its workers run it (first start to last finish), and how many
    workers took part."""
    batch, _ = run_batch(client, [line(i) for i in range(jobs)])
    assert batch.status == "completed" and batch.request_counts.completed == jobs, batch
    engine = create_engine(stack.database_url)
    with engine.connect() as conn:
        span, workers = conn.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(started_at)),"
                " count(DISTINCT worker) FROM jobs WHERE batch_id = :b"
            ),
            {"b": batch.id},
        ).one()
    engine.dispose()
    return jobs / float(span), int(workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sync-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--scale-seqs", type=int, default=32, help="max_num_seqs per worker")
    parser.add_argument("--scale-delay", type=float, default=0.5, help="engine delay, seconds")
    parser.add_argument("--scale-jobs", type=int, default=1600)
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    stack = Stack(
        database="ferry_bench_queue",
        redis_db=10,
        extra_env={"FERRY_BATCH_MAX_LINES": str(max(sizes))},
    )
    stack.reset()
    try:
        stack.start_api()
        key = stack.create_key("bench")
        client = openai.OpenAI(
            base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=600
        )

        print("1. synchronous requests, one fake worker (max_num_seqs 256, engine delay 0)")
        start_workers(stack, 1, 0, 256, 0.0)
        alone = one_at_a_time(client, 200)
        print(f"   one at a time: {alone * 1000:.1f} ms per request (median of 200)")
        rate = sync_rate(client, args.sync_requests, args.concurrency)
        print(
            f"   {args.concurrency} clients: {rate:.0f} jobs/s over {args.sync_requests} requests"
        )
        stop_workers(stack)

        capacity = args.scale_seqs / args.scale_delay
        print(
            f"2. one batch of {args.scale_jobs} jobs; each worker finishes at most "
            f"{capacity:.0f} jobs/s (max_num_seqs {args.scale_seqs}, delay {args.scale_delay} s)"
        )
        rates = {}
        running = 0
        for workers in (1, 2, 4):
            start_workers(stack, workers - running, running, args.scale_seqs, args.scale_delay)
            running = workers
            rates[workers], took_part = batch_rate(stack, client, args.scale_jobs)
            print(
                f"   {workers} worker(s): {rates[workers]:.0f} jobs/s "
                f"({took_part} took part; {rates[workers] / rates[1]:.2f}x one worker)"
            )
        stop_workers(stack)

        print("3. per-job cost by batch size: two fake workers, engine delay 0, upload to done")
        start_workers(stack, 2, 0, 256, 0.0)
        costs = {}
        for size in sizes:
            batch, seconds = run_batch(client, [line(i) for i in range(size)])
            assert batch.status == "completed" and batch.request_counts.completed == size, batch
            costs[size] = seconds
            print(
                f"   {size:>7} jobs: {seconds:7.1f} s, {seconds / size * 1000:.2f} ms per job, "
                f"{size / seconds:.0f} jobs/s"
            )
        small, large = min(sizes), max(sizes)
        print()
        print(f"scaling 4 workers / 1 = {rates[4] / rates[1]:.2f}x (target >= 3.5)")
        print(
            f"cost {large} jobs / {small} jobs = {costs[large] / costs[small]:.1f}x "
            f"(flat: {large // small}x; target <= {large // small * 1.1:.0f}x)"
        )
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
