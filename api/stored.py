"""Stored completions: read, list, update, delete and cancel, always within the caller's project.

What is kept: a `store: true` completion keeps its request and response until deleted. A
`store: false` one keeps them only until delivered (the synchronous answer sent, the stream
finished, the final poll answered), and never longer than FERRY_UNSTORED_PURGE_SECONDS after its
job ended (the reconciler's purge); its accounting row stays.
"""

import asyncio
import logging
import re
from collections.abc import Iterable

from sqlalchemy import and_, case, func, null, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from api.context import ApiContext
from api.pagination import ListQuery, Positioned, in_memory, keyset
from core.bus import JobCancel, JobDone, StreamError, add_to_stream, publish
from core.errors import CancelledError, ConflictError, InvalidRequestError, NotFoundError
from core.tables import ApiKey, Job, JobStatus
from core.validation import check_metadata
from core.wire.resources import (
    ChatCompletionDeleted,
    ChatCompletionList,
    ChatCompletionMessageList,
    StoredChatCompletion,
    StoredMessage,
)

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
    page: ListQuery,
    *,
    model: str | None,
    metadata: dict[str, str],
) -> ChatCompletionList:
    """A page of the caller's stored completions."""
    check_metadata(metadata)
    query = select(Job).where(_LISTED, Job.project == key.project)
    if model is not None:
        query = query.where(Job.model == model)
    if metadata:
        query = query.where(type_coerce(Job.metadata_, JSONB).contains(metadata))

    async def named(job_id: str) -> Positioned:
        # Any job of the project, listed or not, marks a place in the list.
        found = (
            await session.execute(
                select(Job.created_at, Job.id).where(Job.id == job_id, Job.project == key.project)
            )
        ).one_or_none()
        if found is None:
            raise not_found(job_id)
        return found

    jobs = await keyset(session, query, Job.created_at, Job.id, page, named)
    return ChatCompletionList.of([StoredChatCompletion.of(job) for job in jobs], page.limit)


def _no_message(message_id: str) -> NotFoundError:
    return NotFoundError(f"No message found with id '{message_id}'.", param="after")


async def list_messages(
    session: AsyncSession, key: ApiKey, job_id: str, page: ListQuery
) -> ChatCompletionMessageList:
    """A page of a stored completion's request messages."""
    job = await get_visible(session, key, job_id)
    if not job.store or job.request is None:
        raise not_found(job_id)
    messages = [StoredMessage.of(job.id, i, m) for i, m in enumerate(job.request["messages"])]
    listed = in_memory(messages, page, lambda message: message.id, _no_message)
    return ChatCompletionMessageList.of(listed, page.limit)


async def update_metadata(
    session: AsyncSession, key: ApiKey, job_id: str, metadata: dict[str, str] | None
) -> StoredChatCompletion:
    """Replace a stored completion's metadata."""
    check_metadata(metadata)
    job = await get_visible(session, key, job_id)
    if not job.store or job.status != JobStatus.succeeded:
        raise not_found(job_id)
    job.metadata_ = metadata
    if job.response is not None:
        job.response = {**job.response, "metadata": metadata}
    await session.commit()
    return StoredChatCompletion.of(job)


async def delete(session: AsyncSession, key: ApiKey, job_id: str) -> ChatCompletionDeleted:
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
    return ChatCompletionDeleted(id=job_id, deleted=True)


async def cancel(
    ctx: ApiContext, session: AsyncSession, key: ApiKey, job_id: str
) -> StoredChatCompletion:
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
    async with ctx.redis.pipeline(transaction=False) as pipe:
        publish(pipe, JobCancel(job_id))
        publish(pipe, JobDone(job_id))
        if (job.request or {}).get("stream"):
            error = CancelledError()
            add_to_stream(pipe, job_id, StreamError(error.envelope(), error.status_code))
        await pipe.execute()
    return StoredChatCompletion.of(job)
