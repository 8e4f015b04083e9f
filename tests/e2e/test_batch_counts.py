"""A batch's counts and usage, read from its row, agree with its output file, in the batch
object and in the list, on the real stack."""

import openai
import pytest
from sqlalchemy import Engine, text

from tests.e2e.test_batches import line, read_jsonl, run_to_end

pytestmark = pytest.mark.e2e


def test_counts_and_usage_match_the_output(client: openai.OpenAI, db: Engine) -> None:
    lines = [line(f"n-{i}", f"Say the number {i}.") for i in range(6)]
    lines.append(line("too-hot", temperature=7))  # a line error: failed, never a job
    lines.append(line("too-long", max_tokens=4096))  # over the context: the worker fails it
    done = run_to_end(client, lines)
    assert done.status == "completed"
    output = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    answered = [o for o in output if o["response"]["status_code"] == 200]
    assert len(answered) == 6 and len(output) + len(errors) == len(lines)
    counts = done.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (8, 6, 2)
    usages = [o["response"]["body"]["usage"] for o in answered]
    assert done.usage is not None
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    listed = {b.id: b for b in client.batches.list(limit=10).data}[done.id]
    assert listed.request_counts == counts and listed.usage == done.usage
    with db.connect() as conn:
        row = conn.execute(
            text("SELECT completed, failed, invalid FROM batches WHERE id = :b"), {"b": done.id}
        ).one()
    assert tuple(row) == (6, 1, 1)
