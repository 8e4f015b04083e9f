"""An engine without a model, for measuring the queue's own cost (`bench/queue_overhead.py`).

It answers every request after a fixed delay with a fixed text, holding at most max_num_seqs
requests at once as a real engine would. It never stands in for inference in a test of answers.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from workers.engine import LoopHost

FAKE_TEXT = "ok"


class FakeEngineHost(LoopHost):
    async def _open(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.max_num_seqs)

    async def complete(self, request_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        async with self._slots:
            await asyncio.sleep(self.settings.fake_engine_delay_seconds)
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": FAKE_TEXT},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    async def stream(
        self, request_id: str, fields: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        done = await self.complete(request_id, fields)
        base = {k: done[k] for k in ("id", "created", "model")} | {
            "object": "chat.completion.chunk"
        }
        yield base | {
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": FAKE_TEXT}, "logprobs": None}
            ]
        }
        yield base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield base | {"choices": [], "usage": done["usage"]}
