"""A streamed job's chunks, relayed from the engine into its Redis stream as they come."""

import asyncio
import json
import logging
from typing import Any

from core import logs
from core.bus import StreamChunk, StreamEntry, StreamError, add_to_stream
from core.errors import CancelledError, EngineError, FerryError
from workers import shaping
from workers.runtime import ENGINE_FAILED, Runtime

log = logging.getLogger(__name__)


async def relay_stream(
    rt: Runtime, job_id: str, fields: dict[str, Any], answering: shaping.Answering
) -> dict[str, Any]:
    """Stream a job's chunks into its Redis stream as they come; the whole completion at the end."""
    assembler = shaping.StreamAssembler(answering)
    markup = shaping.ToolMarkupFilter() if fields.get("tools") else None
    try:
        async for raw in rt.engine.stream(job_id, fields):
            if markup is not None:
                markup(raw)
            assembler.add(raw)
            shaped = shaping.chunk(raw, answering)
            if shaped is not None:
                await write_stream(rt, job_id, StreamChunk(json.dumps(shaped).encode()))
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            error: FerryError = CancelledError()
        elif isinstance(exc, FerryError):
            error = exc
        else:
            log.error("stream of job %s failed: %r", job_id, exc, extra=logs.job_fields(job_id))
            error = EngineError(ENGINE_FAILED)
        await write_stream(rt, job_id, StreamError(error.envelope(), error.status_code))
        raise
    return assembler.completion()


async def write_stream(rt: Runtime, job_id: str, entry: StreamEntry) -> None:
    """An entry of a job's stream, whose expiry each write sets again (core.bus)."""
    async with rt.stream_redis.pipeline(transaction=False) as pipe:
        add_to_stream(pipe, job_id, entry)
        await pipe.execute()
