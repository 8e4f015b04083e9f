"""Stored completions: read, list, update, delete and cancel, always within the caller's project.

What is kept: a `store: true` completion keeps its request and response until deleted. A
`store: false` one keeps them only until delivered (the synchronous answer sent, the stream
finished, the final poll answered), and never longer than FERRY_UNSTORED_PURGE_SECONDS after its
job ended (the reconciler's purge); its accounting row stays.
"""

import asyncio
import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, case, func, null, select, tuple_, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from api.context import ApiContext
from core.errors import CancelledError, ConflictError, InvalidRequestError, NotFoundError
from core.queue import JOB_CANCEL_CHANNEL, JOB_DONE_CHANNEL, add_to_stream
from core.tables import ApiKey, Job, JobStatus
from core.validation import check_metadata, check_range

log = logging.getLogger(__name__)

FINAL = [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]
_METADATA_FILTER = re.compile(r"metadata\[([^\[\]]*)\]", re.DOTALL)
_LISTED = and_(Job.store, Job.deleted_at.is_(None), Job.status == JobStatus.succeeded)


def not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"No chat completion found with id '{job_id}'.", param="completion_id")


async def get_visible(session: AsyncSession, key: ApiKey, job_id: str) -> Job:
    """The caller's job, while it has content to show; 404 otherwise (never another project's)."""
    job = await session.get(Job, job_id)
    if (
        job is None
        or job.project != key.project
        or job.deleted_at is not None
        or (not job.store and job.request is None)
    ):
        raise not_found(job_id)
    return job


def view(job: Job) -> dict[str, Any]:
    """A job as OpenAI's `chat.completion`, with its `status`; in progress, without choices."""
    if job.status == JobStatus.succeeded and job.response is not None:
        return {**job.response, "status": job.status.value}
    body: dict[str, Any] = {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": [],
        "status": job.status.value,
    }
    if job.metadata_ is not None:
        body["metadata"] = job.metadata_
    if job.error is not None:
        body["error"] = job.error["error"]
    return body


async def mark_delivered(ctx: ApiContext, job: Job) -> None:
    """The job's result reached its client: a `store: false` job's content is to be purged.

    Marked in batches: `deliver_forever` writes every pending mark in one statement.
    """
    if not job.store:
        ctx.delivered.add(job.id)


async def deliver_pending(ctx: ApiContext) -> None:
    """Mark the jobs delivered since the last call, purging `store: false` content."""
    if not ctx.delivered:
        return
    ids, ctx.delivered = ctx.delivered, set()
    final = Job.status.in_(FINAL)
    purge = and_(~Job.store, Job.idempotency_key.is_(None))
    try:
        async with ctx.sessions.begin() as session:
            await session.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(
                    delivered_at=func.coalesce(Job.delivered_at, func.now()),
                    request=case((and_(purge, final), null()), else_=Job.request),
                    response=case((purge, null()), else_=Job.response),
                )
            )
    except Exception:
        ctx.delivered |= ids  # tried again next time
        raise


async def deliver_forever(ctx: ApiContext, every: float = 0.1) -> None:
    """`deliver_pending` every `every` seconds: one UPDATE for many answered requests."""
    while True:
        await asyncio.sleep(every)
        try:
            await deliver_pending(ctx)
        except Exception as exc:
            log.warning("marking delivered results failed (%s); retrying", exc)


def check_page(limit: int, order: str, max_limit: int = 100) -> None:
    """`limit` within 1..max_limit and `order` asc or desc, as OpenAI's list endpoints take."""
    check_range(limit, 1, max_limit, "limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(
            f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.",
            param="order",
            code="invalid_value",
        )


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list object."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else "",
        "last_id": items[-1]["id"] if items else "",
        "has_more": has_more,
    }


def metadata_filter(query: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The `metadata[key]=value` pairs of a list's query string. Any other parameter whose name
    begins with `metadata` (a bare `metadata=`, `metadata[a][b]`, a key given twice) is refused:
    ignored, it would list completions its sender meant to filter out. A key may be empty, as in
    a body's metadata."""
    pairs: dict[str, str] = {}
    for name, value in query:
        if not name.startswith("metadata"):
            continue
        if name == "metadata":
            raise InvalidRequestError(
                "Invalid type for 'metadata': expected an object, written as "
                "'metadata[key]=value' in the query string.",
                param="metadata",
                code="invalid_type",
            )
        found = _METADATA_FILTER.fullmatch(name)
        if found is None:
            raise InvalidRequestError(
                f"Invalid query parameter {name!r}: a metadata filter is 'metadata[key]=value', "
                "with a key without brackets.",
                param="metadata",
                code="invalid_value",
            )
        key = found[1]
        if key in pairs:
            raise InvalidRequestError(
                f"Invalid 'metadata.{key}': the filter is given more than once.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
        pairs[key] = value
    return pairs


async def list_completions(
    session: AsyncSession,
    key: ApiKey,
    *,
    after: str | None,
    limit: int,
    order: str,
    model: str | None,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """A page of the caller's stored completions, keyset-paged on (created_at, id)."""
    check_page(limit, order)
    check_metadata(metadata)
    query = select(Job).where(_LISTED, Job.project == key.project)
    if model is not None:
        query = query.where(Job.model == model)
    if metadata:
        query = query.where(type_coerce(Job.metadata_, JSONB).contains(metadata))
    position = tuple_(Job.created_at, Job.id)
    if after is not None:
        anchor = (
            await session.execute(
                select(Job.created_at, Job.id).where(Job.id == after, Job.project == key.project)
            )
        ).one_or_none()
        if anchor is None:
            raise not_found(after)
        query = query.where(
            position > tuple(anchor) if order == "asc" else position < tuple(anchor)
        )
    direction = (lambda c: c.asc()) if order == "asc" else (lambda c: c.desc())
    query = query.order_by(direction(Job.created_at), direction(Job.id)).limit(limit + 1)
    jobs = (await session.scalars(query)).all()
    return page([view(job) for job in jobs[:limit]], len(jobs) > limit)


def _message(job_id: str, index: int, message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    parts = content if isinstance(content, list) else None
    if parts is not None:
        content = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
    out = {
        "id": f"{job_id}-{index}",
        "role": message["role"],
        "content": content,
        "refusal": None,
        "name": message.get("name"),
        "content_parts": parts,
    }
    for optional in ("tool_calls", "tool_call_id", "function_call"):
        if message.get(optional):
            out[optional] = message[optional]
    return out


async def list_messages(
    session: AsyncSession, key: ApiKey, job_id: str, *, after: str | None, limit: int, order: str
) -> dict[str, Any]:
    """A page of a stored completion's request messages."""
    check_page(limit, order)
    job = await get_visible(session, key, job_id)
    if not job.store or job.request is None:
        raise not_found(job_id)
    messages = [_message(job.id, i, m) for i, m in enumerate(job.request["messages"])]
    if order == "desc":
        messages.reverse()
    if after is not None:
        ids = [m["id"] for m in messages]
        if after not in ids:
            raise NotFoundError(f"No message found with id '{after}'.", param="after")
        messages = messages[ids.index(after) + 1 :]
    return page(messages[:limit], len(messages) > limit)


async def update_metadata(
    session: AsyncSession, key: ApiKey, job_id: str, metadata: dict[str, str] | None
) -> dict[str, Any]:
    """Replace a stored completion's metadata."""
    check_metadata(metadata)
    job = await get_visible(session, key, job_id)
    if not job.store or job.status != JobStatus.succeeded:
        raise not_found(job_id)
    job.metadata_ = metadata
    if job.response is not None:
        job.response = {**job.response, "metadata": metadata}
    await session.commit()
    return view(job)


async def delete(session: AsyncSession, key: ApiKey, job_id: str) -> dict[str, Any]:
    """Delete a stored completion: its content goes, its accounting stays."""
    job = await get_visible(session, key, job_id)
    if not job.store:
        raise not_found(job_id)
    job.deleted_at = func.now()
    job.request = None
    job.response = None
    # A retry with its Idempotency-Key would find nothing to answer with: it runs anew.
    job.idempotency_key = None
    job.request_hash = None
    await session.commit()
    return {"object": "chat.completion.deleted", "id": job_id, "deleted": True}


async def cancel(ctx: ApiContext, session: AsyncSession, key: ApiKey, job_id: str) -> dict:
    """Cancel a queued or running job; the worker running it aborts it in the engine."""
    job = await get_visible(session, key, job_id)
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
        .values(
            status=JobStatus.cancelled,
            finished_at=func.now(),
            error=CancelledError().envelope(),
            error_status=CancelledError.status_code,
        )
    )
    await session.commit()
    if not result.rowcount:  # type: ignore[attr-defined]
        raise ConflictError(
            f"Chat completion '{job_id}' has already ended ({job.status.value}); "
            "only queued or running ones can be cancelled.",
            param="completion_id",
        )
    await session.refresh(job)
    error = json.dumps(CancelledError().envelope())
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.publish(JOB_CANCEL_CHANNEL, job_id)
        pipe.publish(JOB_DONE_CHANNEL, job_id)
        if (job.request or {}).get("stream"):
            add_to_stream(pipe, job_id, {"error": error, "status": CancelledError.status_code})
        await pipe.execute()
    return view(job)
