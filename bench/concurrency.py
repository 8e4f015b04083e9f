"""32 requests at once against one at a time, through Ferry end to end (one worker, real vLLM).

Run: `make bench` (or `.venv/bin/python -m bench.concurrency`). It starts its own stack on a
separate database and prints medians and the ratio: how many times faster 32 requests finish
together than they would one after another.
"""

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from bench.stack import running_stack
from core.settings import DEFAULT_MODEL


def ask(client: openai.OpenAI, i: int, max_tokens: int) -> int:
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": f"Write a short poem about the number {i}."}],
        temperature=0,
        max_tokens=max_tokens,
    )
    assert completion.usage is not None
    return completion.usage.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement")
    args = parser.parse_args()

    with running_stack(database="ferry_bench", redis_db=14) as stack:
        key = stack.create_key("bench")
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        ask(client, 0, args.max_tokens)  # warm-up

        singles, together, tokens_together = [], [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            ask(client, 1, args.max_tokens)
            singles.append(time.perf_counter() - started)

            with ThreadPoolExecutor(args.concurrency) as pool:
                started = time.perf_counter()
                tokens = sum(
                    pool.map(lambda i: ask(client, i, args.max_tokens), range(args.concurrency))
                )
                together.append(time.perf_counter() - started)
            tokens_together.append(tokens)

    single = statistics.median(singles)
    batch = statistics.median(together)
    rate = statistics.median(t / s for t, s in zip(tokens_together, together, strict=True))
    n = args.concurrency
    print(f"one request alone:        median {single:.2f} s ({args.rounds} rounds)")
    print(f"{n} requests at once:      median {batch:.2f} s, {rate:.0f} output tokens/s")
    print(f"{n} x one request:         {n * single:.2f} s")
    print(f"speed-up from batching:   {n * single / batch:.1f}x (32 at once vs one after another)")


if __name__ == "__main__":
    main()
