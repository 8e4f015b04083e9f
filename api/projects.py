"""What a key's project may still do: its limits on each model and what they leave now."""

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.context import ApiContext
from core import project_limits
from core.project_limits import Bucket, Limits
from core.tables import ApiKey, Batch, BatchStatus, ServedModel
from core.wire.resources import BatchQueueTokens, ModelLimits, ProjectLimits, RateWindow


def _window(bucket: Bucket | None) -> RateWindow | None:
    if bucket is None:
        return None
    return RateWindow(
        limit=bucket.limit,
        remaining=max(bucket.remaining, 0),
        reset=project_limits.format_reset(bucket.reset_seconds),
    )


async def limits_now(ctx: ApiContext, session: AsyncSession, key: ApiKey) -> ProjectLimits:
    """The project's limits on every model served or named in its limits, and what is free."""
    assert ctx.limiter is not None
    rows = await ctx.limiter.rows(key.project)
    models = set(await session.scalars(select(ServedModel.name)))
    models |= {row.model for row in rows if row.model is not None}
    batches = (
        await session.execute(
            select(
                Batch.queued_tokens, Batch.total, Batch.invalid, Batch.completed, Batch.failed
            ).where(Batch.project == key.project, Batch.status == BatchStatus.in_progress)
        )
    ).all()
    data = []
    for model in sorted(models):
        limits = project_limits.for_model(rows, model) or Limits()
        usage = await ctx.limiter.usage(key.project, model, limits) if limits.interactive else None
        in_use = project_limits.batch_tokens_in_use(batches, model)
        most = limits.batch_queue_tokens
        data.append(
            ModelLimits(
                model=model,
                rpm=limits.rpm,
                tpm=limits.tpm,
                max_concurrent=limits.max_concurrent,
                batch_queue_tokens=most,
                requests=_window(usage.requests) if usage else None,
                tokens=_window(usage.tokens) if usage else None,
                concurrent=usage.in_flight if usage else None,
                batch_queue=BatchQueueTokens(
                    limit=most,
                    in_use=in_use,
                    free=max(most - in_use, 0) if most is not None else None,
                ),
            )
        )
    return ProjectLimits(project=key.project, data=data)
