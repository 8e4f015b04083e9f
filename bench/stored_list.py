"""Latency of a filtered stored-completions list at 1M stored completions against 10k.

Run: `.venv/bin/python -m bench.stored_list`. It starts an API on its own database (no worker is
needed), fills the database with synthetic stored completions in bulk, and times
`GET /v1/chat/completions?model=...&metadata[user]=...` through HTTP at each size.
"""

import argparse
import statistics
import time

import httpx
from sqlalchemy import text

from bench.stack import scratch_database

FILL = text(
    """
    INSERT INTO jobs (id, project, api_key_id, model, status, request, response, store,
                      metadata, attempts, created_at, finished_at, created,
                      prompt_tokens, completion_tokens, total_tokens)
    SELECT 'chatcmpl-bench' || g, 'default', :key_id,
           CASE WHEN g % 2 = 0 THEN 'model-a' ELSE 'model-b' END, 'succeeded',
           jsonb_build_object('model', 'model-a', 'messages',
                              jsonb_build_array(jsonb_build_object('role', 'user',
                                                                   'content', 'hi ' || g))),
           jsonb_build_object('id', 'chatcmpl-bench' || g, 'object', 'chat.completion',
                              'created', 1700000000 + g, 'model', 'model-a',
                              'choices', jsonb_build_array(jsonb_build_object(
                                  'index', 0, 'finish_reason', 'stop', 'logprobs', null,
                                  'message', jsonb_build_object('role', 'assistant',
                                      'content', 'hello ' || g, 'refusal', null)))),
           true,
           jsonb_build_object('user', 'u' || (g % 1000), 'batch', 'b' || (g % 10)),
           1, now() - make_interval(secs => CAST(:total AS bigint) - g), now(),
           1700000000 + g, 5, 2, 7
    FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g
    """
)


def fill(engine, key_id: str, start: int, stop: int, total: int, chunk: int = 100_000) -> None:
    for lo in range(start, stop + 1, chunk):
        with engine.begin() as conn:
            conn.execute(
                FILL,
                {"key_id": key_id, "start": lo, "stop": min(lo + chunk - 1, stop), "total": total},
            )
    with engine.begin() as conn:
        conn.execute(text("ANALYZE jobs"))


def timed(client: httpx.Client, rounds: int) -> tuple[float, float]:
    params = {"model": "model-a", "metadata[user]": "u42", "limit": 20, "order": "desc"}
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        page = client.get("/v1/chat/completions", params=params)
        samples.append(time.perf_counter() - started)
        assert page.status_code == 200 and len(page.json()["data"]) > 0, page.text
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    with scratch_database("ferry_bench_list", 11) as (stack, engine, key):
        with engine.connect() as conn:
            key_id = conn.execute(text("SELECT id FROM api_keys")).scalar_one()
        stack.start_api()
        headers = {"Authorization": f"Bearer {key}"}
        results = {}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as client:
            filled = 0
            for size in (args.small, args.large):
                started = time.perf_counter()
                fill(engine, key_id, filled + 1, size, args.large)
                print(
                    f"filled {size:>9,} stored completions ({time.perf_counter() - started:.0f} s)"
                )
                filled = size
                timed(client, 10)  # warm-up
                results[size] = timed(client, args.rounds)

    print("GET /v1/chat/completions?model=model-a&metadata[user]=u42&limit=20&order=desc")
    for size, (p50, p95) in results.items():
        print(f"  {size:>9,} stored: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    ratio = results[args.large][0] / results[args.small][0]
    print(f"p50 at {args.large:,} / p50 at {args.small:,}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
