"""Synchronous latency: Ferry against `vllm serve` on the same model and engine settings.

Run: `.venv/bin/python -m bench.latency`. For concurrency 1, 8 and 32 it sends non-streamed
chat requests (fixed prompt, temperature 0, fixed max_tokens) first to vLLM's own OpenAI server,
then to Ferry (API + one worker), and prints p50/p95 latency, output tokens/s, the p50 Ferry adds
at concurrency 1, and Ferry's throughput at concurrency 32 as a share of vLLM's. The latency
Ferry adds is also measured alone: 100 requests one at a time with max_tokens 2, where the
engine's own time (and its noise) is smallest.
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai

from bench.stack import ROOT, free_port, running_stack, wait_until_up
from core.settings import DEFAULT_MODEL

LEVELS = (1, 8, 32)


@contextlib.contextmanager
def vllm_server() -> Iterator[str]:
    """vLLM's own OpenAI server with exactly the engine arguments a Ferry worker uses (as shipped,
    decided for this platform; the default model's chat template and tool parser)."""
    from core.settings import WorkerSettings
    from workers.engine import engine_argv
    from workers.main import resolve_model

    settings, path = resolve_model(WorkerSettings())
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib)}
    ROOT.joinpath("test-artifacts").mkdir(exist_ok=True)
    log = open(ROOT / "test-artifacts" / "vllm-serve.log", "wb")  # noqa: SIM115 - server's life
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *engine_argv(settings, path),
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, "vLLM's api_server", 300)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


def measure(
    base_url: str, key: str, max_tokens: int, per_thread: int, short_rounds: int
) -> dict[int | str, tuple]:
    """(p50, p95, tok/s) by concurrency; under "short", one at a time with max_tokens 2, where
    the engine's own time is smallest and what the service adds shows most."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)

    def ask(_: int, max_tokens: int = max_tokens) -> tuple[float, int]:
        started = time.perf_counter()
        done = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Write a short poem about the sea."}],
            max_tokens=max_tokens,
            temperature=0,
        )
        assert done.usage is not None
        return time.perf_counter() - started, done.usage.completion_tokens

    for _ in range(3):
        ask(0)  # warm-up
    results: dict[int | str, tuple] = {}
    short = sorted(ask(0, 2)[0] for _ in range(short_rounds))
    results["short"] = (statistics.median(short), short[int(len(short) * 0.95) - 1], 0.0)
    for level in LEVELS:
        count = max(level * per_thread, 20 if level == 1 else 0)
        with ThreadPoolExecutor(level) as pool:
            started = time.perf_counter()
            runs = list(pool.map(ask, range(count)))
            wall = time.perf_counter() - started
        latencies = sorted(r[0] for r in runs)
        results[level] = (
            statistics.median(latencies),
            latencies[max(0, int(len(latencies) * 0.95) - 1)],
            sum(r[1] for r in runs) / wall,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--per-thread", type=int, default=4)
    parser.add_argument("--short-rounds", type=int, default=100)
    args = parser.parse_args()

    with vllm_server() as url:
        vllm = measure(url, "none", args.max_tokens, args.per_thread, args.short_rounds)
    with running_stack(database="ferry_bench", redis_db=14) as stack:
        key = stack.create_key("bench")
        ferry = measure(
            f"{stack.base_url}/v1", key, args.max_tokens, args.per_thread, args.short_rounds
        )

    print(f"non-streamed, max_tokens {args.max_tokens}, temperature 0; p50 / p95 latency, tok/s")
    for level in LEVELS:
        v, f = vllm[level], ferry[level]
        print(
            f"  concurrency {level:>2}: vllm serve {v[0] * 1000:6.0f} / {v[1] * 1000:6.0f} ms "
            f"{v[2]:5.0f} tok/s | Ferry {f[0] * 1000:6.0f} / {f[1] * 1000:6.0f} ms "
            f"{f[2]:5.0f} tok/s"
        )
    v, f = vllm["short"], ferry["short"]
    print(
        f"p50 Ferry adds at concurrency 1 (max_tokens 2, {args.short_rounds} requests, where the "
        f"engine's own time and noise are smallest): {(f[0] - v[0]) * 1000:.1f} ms "
        f"(vllm serve {v[0] * 1000:.1f} ms, Ferry {f[0] * 1000:.1f} ms; p95 adds "
        f"{(f[1] - v[1]) * 1000:.1f} ms)"
    )
    print(
        f"  (with max_tokens {args.max_tokens} the engine's run-to-run noise dominates: "
        f"{(ferry[1][0] - vllm[1][0]) * 1000:.1f} ms)"
    )
    print(f"throughput at concurrency 32, Ferry / vllm serve: {ferry[32][2] / vllm[32][2]:.2f}")


if __name__ == "__main__":
    main()
