"""Time to first token as a share of the whole answer, for a 200-token streamed answer.

Run: `.venv/bin/python -m bench.streaming`. It starts its own stack (one worker, real vLLM),
streams the same request several times, and prints medians.
"""

import argparse
import statistics
import time

import openai

from bench.stack import running_stack
from core.settings import DEFAULT_MODEL


def one(client: openai.OpenAI, max_tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    tokens = 0
    events = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for event in events:
        if first is None and event.choices and event.choices[0].delta.content:
            first = time.perf_counter() - started
        if event.usage:
            tokens = event.usage.completion_tokens
    total = time.perf_counter() - started
    assert first is not None
    return first, total, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with running_stack(database="ferry_bench", redis_db=14) as stack:
        key = stack.create_key("bench")
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        one(client, 8)  # warm-up
        runs = [one(client, args.max_tokens) for _ in range(args.rounds)]

    firsts, totals, tokens = zip(*runs, strict=True)
    first, total = statistics.median(firsts), statistics.median(totals)
    print(
        f"streamed answer:      median {statistics.median(tokens):.0f} tokens, {args.rounds} rounds"
    )
    print(f"time to first token:  median {first * 1000:.0f} ms")
    print(f"whole answer:         median {total:.2f} s")
    print(f"first token at:       {100 * first / total:.1f}% of the whole answer's time")


if __name__ == "__main__":
    main()
