"""Fair share of the batch queue: a small batch behind a huge one, from another project.

One worker on the fake engine (it holds --seqs requests at once and answers each after --delay
seconds, so the engine's capacity is seqs / delay jobs/s and every figure is the queue's own
behaviour). Project A submits --big lines; once A's batch is running, project B submits
--small. Each is also run alone, before.

    python -m bench.fair_share

Targets: B's batch, behind A's, completes within 2x of its time alone; A's total time grows by
no more than B's time alone (B's share of the worker).
"""

import argparse
import statistics
import threading
import time

import openai

from bench.stack import Stack, batch_line, run_batch

MODEL = "fake-model"


def lines(count: int, tag: str) -> list[dict]:
    return [batch_line(f"{tag}-{i}", MODEL, f"{tag} {i}") for i in range(count)]


def timed(client: openai.OpenAI, count: int, tag: str) -> float:
    batch, seconds = run_batch(client, lines(count, tag))
    assert batch.status == "completed" and batch.request_counts.completed == count, batch
    return seconds


def shared(a: openai.OpenAI, b: openai.OpenAI, args: argparse.Namespace, r: int):
    """A's batch, and B's submitted once a tenth of A's lines are done: their seconds."""
    a_time: list[float] = []
    runner = threading.Thread(target=lambda: a_time.append(timed(a, args.big, f"a{r}")))
    runner.start()
    while True:
        running = [x for x in a.batches.list(limit=5) if x.status == "in_progress"]
        if running and running[0].request_counts.completed >= args.big // 10:
            break
        time.sleep(0.2)
    b_time = timed(b, args.small, f"b-behind{r}")
    runner.join()
    return a_time[0], b_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", type=int, default=20_000, help="project A's lines")
    parser.add_argument("--small", type=int, default=200, help="project B's lines")
    parser.add_argument("--seqs", type=int, default=64, help="the fake engine's max_num_seqs")
    parser.add_argument("--delay", type=float, default=0.1, help="its seconds per request")
    parser.add_argument("--rounds", type=int, default=3, help="B's runs alone (median)")
    parser.add_argument("--big-rounds", type=int, default=2, help="A's runs, alone and shared")
    args = parser.parse_args()

    stack = Stack(database="ferry_bench_fair", redis_db=9)
    stack.reset()
    try:
        stack.start_api()
        stack.start_worker(
            "fake-worker",
            "--model",
            MODEL,
            FERRY_ENGINE="fake",
            FERRY_MAX_NUM_SEQS=str(args.seqs),
            FERRY_FAKE_ENGINE_DELAY_SECONDS=str(args.delay),
        )
        stack.wait_for_workers(1, timeout=60)
        clients = {}
        for project in ("team-a", "team-b"):
            stack.ferry("projects", "create", project)
            key = stack.create_key("bench", project=project)
            clients[project] = openai.OpenAI(
                base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=600
            )
        a, b = clients["team-a"], clients["team-b"]
        print(
            f"one fake worker: max_num_seqs {args.seqs}, {args.delay:g} s per request "
            f"(capacity {args.seqs / args.delay:.0f} jobs/s)"
        )

        b_alone = statistics.median(timed(b, args.small, f"b{r}") for r in range(args.rounds))
        print(f"B alone: {args.small} lines in {b_alone:.2f} s (median of {args.rounds})")
        a_alone: list[float] = []
        a_shared: list[float] = []
        b_shared: list[float] = []
        # A alone and A with B behind it take turns, so that drift on the host hits both.
        for r in range(args.big_rounds):
            a_alone.append(timed(a, args.big, f"a-alone{r}"))
            a_time, b_time = shared(a, b, args, r)
            a_shared.append(a_time)
            b_shared.append(b_time)
            print(
                f"round {r + 1}: A alone {a_alone[-1]:.1f} s; A with B {a_time:.1f} s, "
                f"B behind A {b_time:.2f} s"
            )
        growth = statistics.median(a_shared) - statistics.median(a_alone)
        print(
            f"B behind A / B alone: {statistics.median(b_shared) / b_alone:.2f} (target <= 2); "
            f"A's growth {growth:+.1f} s / B alone: {growth / b_alone:.2f} (target <= 1); "
            f"medians of {args.big_rounds}"
        )
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
