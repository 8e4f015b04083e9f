"""Batch throughput: the same chat requests through vLLM alone and through Ferry, in one run.

Run: `.venv/bin/python -m bench.throughput [--requests 256] [--max-tokens 64]`.
  (a) vLLM's offline `LLM.chat`, all requests in one call (engine start not timed);
  (b) vLLM's `run_batch` on the same JSONL (its wall time includes its engine start, reported
      alongside; the rate is also given without the engine start measured in (a));
  (c) Ferry end to end: upload, batch, every result in Postgres, with one worker (from
      `batches.create` until the batch is completed).
All three run a worker's engine settings as shipped, decided for this platform (on a CPU build:
float32, eager), and its KV cache.
Prints output tokens/s of each and the ratios c/a and c/b.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.stack import run_for_json
from core.settings import DEFAULT_MODEL

if TYPE_CHECKING:
    from core.settings import WorkerSettings

TOPICS = ["the sea", "a lighthouse", "a cat", "the moon", "a train", "a forest", "rain", "bread"]


def engine_settings() -> tuple["WorkerSettings", str]:
    """A worker's settings as shipped, completed for this platform, and the model's folder."""
    from core.settings import WorkerSettings
    from workers.main import resolve_model

    return resolve_model(WorkerSettings())


def requests(n: int, max_tokens: int) -> list[dict]:
    return [
        {
            "custom_id": f"r-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": DEFAULT_MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}, "
                        f"number {i}.",
                    }
                ],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]


def offline(path: str, n: int, max_tokens: int) -> None:
    """(a), in its own process: prints {"start": s, "seconds": s, "tokens": n}."""
    from vllm import LLM, SamplingParams

    settings, _ = engine_settings()
    started = time.perf_counter()
    llm = LLM(
        model=path,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=settings.enforce_eager,
        dtype=settings.dtype,
    )
    start = time.perf_counter() - started
    conversations = [r["body"]["messages"] for r in requests(n, max_tokens)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.chat(conversations[:4], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"start": start, "seconds": seconds, "tokens": tokens}), flush=True)


def run_batch(settings: "WorkerSettings", path: str, lines: list[dict]) -> tuple[float, int]:
    """(b): wall time of vLLM's batch runner, and output tokens."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.jsonl", Path(folder) / "out.jsonl"
        for line in lines:
            line["body"]["model"] = path
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.run_batch",
                "-i",
                str(source),
                "-o",
                str(target),
                "--model",
                path,
                "--max-model-len",
                str(settings.max_model_len),
                "--max-num-seqs",
                str(settings.max_num_seqs),
                "--dtype",
                settings.dtype,
                *(["--enforce-eager"] if settings.enforce_eager else []),
            ],
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
        tokens = sum(
            json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
            for x in target.read_text().splitlines()
        )
    return seconds, tokens


def ferry(lines: list[dict]) -> tuple[float, int]:
    """(c): from batch creation until completion, and output tokens."""
    import openai

    from bench.stack import run_batch, running_stack

    with running_stack(database="ferry_bench", redis_db=14) as stack:
        key = stack.create_key("bench")
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )  # warm-up
        batch, seconds = run_batch(client, lines)
        assert batch.status == "completed" and batch.request_counts.completed == len(lines)
        assert batch.usage is not None
        return seconds, batch.usage.output_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    settings, path = engine_settings()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kv_cache_gib)
    if args.offline:
        offline(path, args.requests, args.max_tokens)
        return

    a = run_for_json(
        "bench.throughput",
        "--offline",
        "--requests",
        str(args.requests),
        "--max-tokens",
        str(args.max_tokens),
    )
    b_seconds, b_tokens = run_batch(settings, path, requests(args.requests, args.max_tokens))
    c_seconds, c_tokens = ferry(requests(args.requests, args.max_tokens))

    rate_a = a["tokens"] / a["seconds"]
    rate_b = b_tokens / b_seconds
    rate_b_run = b_tokens / max(b_seconds - a["start"], 1e-9)
    rate_c = c_tokens / c_seconds
    mode = "eager" if settings.enforce_eager else "compiled"
    print(
        f"{args.requests} requests, max_tokens {args.max_tokens}, temperature 0, one engine: "
        f"{settings.dtype}, {mode}, {settings.max_num_seqs} sequences"
    )
    print(
        f"(a) vLLM LLM.chat:   {a['tokens']:>6} tokens in {a['seconds']:6.1f} s "
        f"= {rate_a:6.0f} tok/s"
    )
    print(
        f"(b) vLLM run_batch:  {b_tokens:>6} tokens in {b_seconds:6.1f} s = {rate_b:6.0f} tok/s "
        f"(with its engine start; {rate_b_run:.0f} tok/s without the {a['start']:.0f} s start)"
    )
    print(f"(c) Ferry batch:     {c_tokens:>6} tokens in {c_seconds:6.1f} s = {rate_c:6.0f} tok/s")
    print(
        f"c/a = {rate_c / rate_a:.2f}   c/b = {rate_c / rate_b:.2f} "
        f"(c/b without b's engine start = {rate_c / rate_b_run:.2f})"
    )


if __name__ == "__main__":
    main()
