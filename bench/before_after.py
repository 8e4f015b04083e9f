"""The benches a change must not regress, run on an earlier commit and on this tree, in one run.

Run: `.venv/bin/python -m bench.before_after --base REV [--rounds 1] [--only bench.latency]`.
Each round runs every bench on REV (checked out in a temporary worktree) and then on this tree,
one after the other, so that both see the same machine; the lines each bench ends with are
printed side by side. The benches: the throughput ratio against vLLM offline
(`bench.throughput`), the p50 Ferry adds to a synchronous request (`bench.latency`), and batch
ingestion (`bench.batch_ingest`).
"""

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from bench.stack import ROOT, run_module

# Each bench, the arguments it runs with, and the start of each line of its that is compared.
BENCHES = [
    ("bench.throughput", [], ["(a)", "(c)", "c/a"]),
    ("bench.latency", [], ["p50 Ferry adds", "throughput at"]),
    ("bench.batch_ingest", ["--lines", "20000"], ["validate and persist", "ingestion:"]),
]


def run(tree: Path, module: str, args: list[str]) -> str:
    """The bench's output, run from `tree` (its code first on the path)."""
    done = run_module(module, *args, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", action="append", help="a bench module to run (repeatable)")
    args = parser.parse_args()
    benches = [b for b in BENCHES if not args.only or b[0] in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        (base / ".venv").symlink_to(ROOT / ".venv")
        try:
            for round_ in range(1, args.rounds + 1):
                for module, bench_args, keys in benches:
                    outputs = {
                        name: run(tree, module, bench_args)
                        for name, tree in (("before", base), ("after", ROOT))
                    }
                    print(f"== round {round_}: {module} {' '.join(bench_args)}", flush=True)
                    for name, output in outputs.items():
                        lines = [line.strip() for line in output.splitlines()]
                        kept = [line for line in lines if any(line.startswith(k) for k in keys)]
                        for line in kept or [output.strip()[-300:]]:
                            print(f"  {name:<6} {line}", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )


if __name__ == "__main__":
    main()
