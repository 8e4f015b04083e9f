"""The CPU engine's modes side by side: right answers and output tokens/s, in one run.

Run: `.venv/bin/python -m bench.engine_modes [--requests 256] [--max-tokens 64]`.
Each mode (dtype, eager or compiled) gets its own process with vLLM's offline `LLM.chat` on the
prepared default model and the worker's other engine settings. It prints whether the mode passes
the worker's self-check (the default model's known answers, greedy), the engine's start time, and
output tokens/s over the same conversations, with the ratio to the fastest mode.
"""

import argparse
import json
import os
import time

from bench.stack import run_for_json
from core.settings import DEFAULT_MODEL, WorkerSettings

MODES = {
    "bfloat16 eager": {"dtype": "bfloat16", "enforce_eager": True},
    "float32 compiled": {"dtype": "float32", "enforce_eager": False},
    "bfloat16 compiled": {"dtype": "bfloat16", "enforce_eager": False},
    "float32 eager": {"dtype": "float32", "enforce_eager": True},
}
TOPICS = ["the sea", "a lighthouse", "a cat", "the moon", "a train", "a forest", "rain", "bread"]


def measure(mode: str, n: int, max_tokens: int) -> None:
    """One mode, in its own process: prints a JSON line of its figures."""
    from vllm import LLM, SamplingParams

    from workers.model_prep import prepare_default_model
    from workers.self_check import DEFAULT_CHECKS, failures

    settings = WorkerSettings()
    started = time.perf_counter()
    llm = LLM(
        model=str(prepare_default_model(settings.cache_dir)),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        **MODES[mode],
    )
    start = time.perf_counter() - started
    greedy = SamplingParams(temperature=0, max_tokens=32)
    answers = llm.chat(
        [[{"role": "user", "content": check.prompt}] for check in DEFAULT_CHECKS],
        greedy,
        use_tqdm=False,
    )
    wrong = failures(DEFAULT_CHECKS, [a.outputs[0].text for a in answers])
    conversations = [
        [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}, number {i}."}]
        for i in range(n)
    ]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        json.dumps(
            {
                "start": start,
                "seconds": seconds,
                "tokens": tokens,
                "wrong": [f"{c.prompt!r} -> {text!r}" for c, text in wrong],
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES)
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure(args.one, args.requests, args.max_tokens)
        return
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(WorkerSettings().cpu_kv_cache_gib),
    }
    print(f"{DEFAULT_MODEL}, {args.requests} conversations, max_tokens {args.max_tokens}")
    rows = {}
    for mode in args.modes.split(","):
        try:
            rows[mode] = run_for_json(
                "bench.engine_modes",
                "--one",
                mode,
                "--requests",
                str(args.requests),
                "--max-tokens",
                str(args.max_tokens),
                env=env,
            )
        except RuntimeError as exc:
            print(f"{mode}: failed: {exc}")
            continue
        row = rows[mode]
        print(
            f"  {mode}: {row['tokens'] / row['seconds']:.0f} tok/s, start {row['start']:.0f} s, "
            f"self-check {'fails' if row['wrong'] else 'passes'}",
            flush=True,
        )
    best = max((r["tokens"] / r["seconds"] for r in rows.values()), default=1)
    print("\n| mode | self-check | engine start | output tok/s | vs fastest |")
    print("| --- | --- | --- | --- | --- |")
    for mode, row in rows.items():
        rate = row["tokens"] / row["seconds"]
        check = "fails: " + "; ".join(row["wrong"]) if row["wrong"] else "passes"
        print(f"| {mode} | {check} | {row['start']:.0f} s | {rate:.0f} | {rate / best:.2f} |")


if __name__ == "__main__":
    main()
