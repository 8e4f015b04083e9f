"""What a project's limits add to a synchronous request: its p50 with limits on (a project with
RPM, TPM and jobs-at-once limits, never reached) against off (a project with no limits row).

A fake worker (engine delay 0) answers, so the figures are Ferry's own; requests alternate
between the two projects, one at a time, each first in turn, so that drift hits both alike.

    python -m bench.rate_limits [--rounds 500] [--database ferry_bench_limits] [--redis-db 10]
"""

import argparse
import json
import statistics
import time

import openai

from bench.queue_overhead import MODEL, start_workers
from bench.stack import Stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--database", default="ferry_bench_limits")
    parser.add_argument("--redis-db", type=int, default=10)
    args = parser.parse_args()
    stack = Stack(database=args.database, redis_db=args.redis_db)
    stack.reset()
    try:
        start_workers(stack, 1, 0, seqs=16, delay=0)
        stack.start_api()
        clients = {}
        for name, limited in (("off", False), ("on", True)):
            stack.ferry("projects", "create", f"bench-{name}")
            if limited:
                stack.ferry(
                    "projects",
                    "limits",
                    f"bench-{name}",
                    "--rpm=1000000000",
                    "--tpm=1000000000000",
                    "--max-concurrent=1000000",
                )
            key = stack.create_key(name, project=f"bench-{name}")
            clients[name] = openai.OpenAI(
                base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0
            )
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        for client in clients.values():  # warm up: connections, caches
            for _ in range(20):
                client.chat.completions.create(**body)
        times: dict[str, list[float]] = {"off": [], "on": []}
        order = list(clients.items())
        for _ in range(args.rounds):
            # Each first half the time: a request pays for the one before it's background work.
            order.reverse()
            for name, client in order:
                started = time.perf_counter()
                answer = client.chat.completions.with_raw_response.create(**body)
                times[name].append((time.perf_counter() - started) * 1000)
                assert ("x-ratelimit-limit-requests" in answer.headers) == (name == "on")
        off, on = (statistics.median(times[n]) for n in ("off", "on"))
        print(f"sync p50, limits off: {off:.2f} ms; on: {on:.2f} ms; added: {on - off:+.2f} ms")
        print(json.dumps({"p50_off_ms": off, "p50_on_ms": on, "added_ms": on - off}))
    finally:
        stack.stop()
        stack.drop_database()


if __name__ == "__main__":
    main()
