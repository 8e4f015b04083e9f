"""Two workers serving two models: each model's requests reach its own worker only.

The second worker runs the fake engine (no model, a fixed answer): this tests the queues'
routing, not inference; the suite's model is answered by its real vLLM worker.
"""

import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

PROBE = "routing-probe"


def test_two_models_are_routed_to_their_own_workers(
    live_worker: Stack, client: openai.OpenAI, db: Engine
) -> None:
    probe = live_worker.start_worker("worker-probe", "--model", PROBE, FERRY_ENGINE="fake")
    try:
        live_worker.wait_for_workers(2, timeout=60)
        asked = {}
        for model in (MODEL, PROBE, MODEL, PROBE):
            completion = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
            )
            assert completion.model == model
            asked[completion.id] = (model, completion)
        with db.connect() as conn:
            workers = dict(
                conn.execute(
                    text("SELECT id, worker FROM jobs WHERE id = ANY(:ids)"), {"ids": list(asked)}
                ).all()
            )
        for job_id, (model, completion) in asked.items():
            assert workers[job_id].startswith(f"{model}@"), (model, workers[job_id])
            if model == PROBE:
                assert completion.system_fingerprint == "fp_fake"
            else:
                assert completion.system_fingerprint != "fp_fake"
    finally:
        probe.terminate()
        probe.wait(60)
        with db.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE model = :m"), {"m": PROBE})
            conn.execute(text("DELETE FROM served_models WHERE name = :m"), {"m": PROBE})
