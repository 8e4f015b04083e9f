"""The FastAPI application: the lifespan owns the pools; routes stay thin."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from fastapi import FastAPI

from api import stored
from api import webhooks as webhook_sender
from api.auth import BearerAuth
from api.batches import loop as batch_loop
from api.cache import TtlCache
from api.context import ApiContext
from api.errors import install_error_handlers
from api.headers import SecurityHeaders
from api.limits import install_limits
from api.metrics import HttpMetrics
from api.openapi import install_openapi
from api.rate_limits import RateLimiter
from api.reconciler import Reconciler
from api.routes import batches as batch_routes
from api.routes import chat, docs, files, health, models, projects, usage
from api.routes import dashboard as dashboard_routes
from api.routes import metrics as metrics_routes
from api.shutdown import AnswerWhenCutOff
from api.waiter import JobWaiter
from core.db import async_engine, async_sessions
from core.queue import make_celery
from core.settings import ApiSettings, api_settings

log = logging.getLogger(__name__)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the API application."""
    settings = settings or api_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = async_engine(settings.database_url, settings.db_pool_size)
        redis = aioredis.from_url(settings.redis_url, health_check_interval=10)
        lookups = TtlCache(settings.lookup_cache_seconds)
        sessions = async_sessions(engine)
        limiter = RateLimiter(redis, sessions, lookups)
        waiter = JobWaiter(redis, lookups.clear, limiter.job_done)
        await waiter.start()
        app.state.ctx = ApiContext(
            settings=settings,
            engine=engine,
            sessions=sessions,
            redis=redis,
            celery=make_celery(settings, "ferry-api"),
            waiter=waiter,
            lookups=lookups,
            limiter=limiter,
        )
        loops = [
            asyncio.create_task(batch_loop.tend_forever(app.state.ctx)),
            asyncio.create_task(Reconciler(app.state.ctx).forever()),
            asyncio.create_task(stored.deliver_forever(app.state.ctx)),
            asyncio.create_task(webhook_sender.Sender(app.state.ctx).forever()),
        ]
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
            with contextlib.suppress(Exception):
                await stored.deliver_pending(app.state.ctx)
            await waiter.stop()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Ferry",
        summary="An OpenAI-compatible chat completions service.",
        version="0.1.0",
        lifespan=lifespan,
        # Swagger UI is served from the API's own files (api.routes.docs), never from a CDN;
        # ReDoc, which only comes from one, is not served.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    # Inside auth: a request without a valid key is refused before its body is read.
    install_limits(app, settings)
    # A request the shutdown cuts off gets OpenAI's 503 rather than uvicorn's bare 500.
    app.add_middleware(AnswerWhenCutOff)
    app.add_middleware(BearerAuth)
    # Outside auth: the requests it refuses are counted too.
    app.add_middleware(HttpMetrics)
    # Outermost: every answer, a refusal by any middleware included, gets the headers.
    app.add_middleware(SecurityHeaders)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(files.router)
    app.include_router(batch_routes.router)
    app.include_router(projects.router)
    app.include_router(usage.router)
    app.include_router(metrics_routes.router)
    app.include_router(dashboard_routes.router)
    if settings.docs:
        app.include_router(docs.router)
    return app
