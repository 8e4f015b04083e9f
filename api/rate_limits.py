"""Projects' limits on interactive requests, held in Redis so that every API process shares them.

A request of a project with limits on its model costs one Redis round trip before its job is
stored: one Lua script checks requests per minute, tokens per minute and jobs at once together,
and counts the request only if all three let it pass (a refused request costs nothing but a
count of refusals, api.throttled). When
the job ends (every job's end is published, core.bus.JobDone), the process that admitted it
releases its place and corrects its tokens to the engine's exact usage; the reconciler releases
what a process that died could not (`sweep`). A project with no limits costs no trip at all.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from api import throttled
from api.cache import TtlCache
from core import project_limits
from core.bus import JobDone
from core.errors import RateLimitError, ServiceUnavailableError
from core.project_limits import Bucket, Limits
from core.tables import ApiKey, Job, ProjectLimit
from core.wire.requests import ChatCompletionRequest

log = logging.getLogger(__name__)

WINDOW_MS = project_limits.WINDOW_SECONDS * 1000
# Every hash of jobs in flight, for the sweep.
IN_FLIGHT_KEYS = "ferry:limits:in-flight"
# A job in flight younger than this is left alone by the sweep: it may not be committed yet.
SWEEP_GRACE_MS = 60_000
# Jobs this process admitted and has not seen end: dropped past this many (the sweep releases
# them), so that notifications lost while Redis was away cannot grow it without end.
MOST_TRACKED = 100_000

# A bucket holds up to `cap` and refills by `cap` a window; its level is kept with the time it
# was read (Redis' clock: the same for every API process).
_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local function level(key, cap)
  if cap < 0 then return 0 end
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return cap end
  local l = tonumber(v[1]) + (now - tonumber(v[2])) * cap / window
  if l > cap then return cap end
  return l
end
local function store(key, cap, l)
  redis.call('HSET', key, 'level', l, 'at', now)
  redis.call('PEXPIRE', key, math.ceil((cap - l) * window / cap) + 1000)
end
local function until_full(cap, l)
  if cap <= 0 then return 0 end
  return math.ceil((cap - l) * window / cap)
end
"""

# KEYS: requests bucket, tokens bucket, jobs in flight (hash id -> "estimate:admitted ms"), every
# hash of jobs in flight, refusals counted (api.throttled).
# ARGV: window ms, rpm, tpm, max_concurrent (-1: none), estimated tokens, job id ('' only reads),
# the refusals' minute prefix, their field's start (project NUL model NUL).
# Returns: refused ('' or requests, tokens, concurrent), wait ms, requests left, ms until the
# requests bucket is full, tokens left, ms until the tokens bucket is full, jobs in flight.
# A refusal is counted here, with the limit that refused it: counted once, whichever process.
_ADMIT = (
    _LEVEL
    + throttled.COUNT_LUA
    + """
local rpm, tpm, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, job = tonumber(ARGV[5]), ARGV[6]
local r, k = level(KEYS[1], rpm), level(KEYS[2], tpm)
local running = redis.call('HLEN', KEYS[3])
local refused, wait = '', 0
if job ~= '' then
  if most >= 0 and running >= most then
    refused, wait = 'concurrent', 1000
  elseif rpm >= 0 and r < 1 then
    refused, wait = 'requests', math.ceil((1 - r) * window / rpm)
  elseif tpm >= 0 and k < cost then
    refused = 'tokens'
    if cost > tpm then wait = -1 else wait = math.ceil((cost - k) * window / tpm) end
  else
    if rpm >= 0 then r = r - 1; store(KEYS[1], rpm, r) end
    if tpm >= 0 then k = k - cost; store(KEYS[2], tpm, k) end
    redis.call('HSET', KEYS[3], job, cost .. ':' .. now)
    redis.call('SADD', KEYS[4], KEYS[3])
    running = running + 1
  end
  if refused ~= '' then
    local named = {concurrent = 'max_concurrent', requests = 'rpm', tokens = 'tpm'}
    count_refusal(KEYS[5], ARGV[7], ARGV[8] .. named[refused])
  end
end
return {refused, wait, math.floor(r), until_full(rpm, r), math.floor(k), until_full(tpm, k),
        running}
"""
)

# KEYS: tokens bucket, jobs in flight. ARGV: window ms, job id, tokens used (-1: keep the
# estimate), tpm (-1: none). Returns 1 if the job was in flight (its release is counted once).
_RELEASE = (
    _LEVEL
    + """
local v = redis.call('HGET', KEYS[2], ARGV[2])
if not v then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
local used, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
if used >= 0 and tpm > 0 then
  local estimate = tonumber(string.match(v, '^(%d+)'))
  local k = level(KEYS[1], tpm) + estimate - used
  if k > tpm then k = tpm end
  store(KEYS[1], tpm, k)
end
return 1
"""
)


def _key(project: str, model: str, what: str) -> str:
    return f"ferry:limits:{project}\x00{model}:{what}"


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


@dataclass(frozen=True)
class Counted:
    """A job admitted under limits, until it ends."""

    project: str
    model: str
    tpm: int | None


@dataclass(frozen=True)
class Usage:
    """What a project may still do on a model this minute, as the limits endpoint says it."""

    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int


class RateLimiter:
    """Admits interactive requests under their project's limits and releases them as they end."""

    def __init__(
        self, redis: aioredis.Redis, sessions: async_sessionmaker, lookups: TtlCache
    ) -> None:
        self.redis = redis
        self.sessions = sessions
        self.lookups = lookups
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)
        self.counted: dict[str, Counted] = {}
        # Releases under way, by job: whoever sees a job end first starts its release.
        self._releasing: dict[str, asyncio.Future[None]] = {}

    async def rows(self, project: str) -> list[ProjectLimit]:
        """The project's limit rows, read at most once per lookup cache period."""
        rows = self.lookups.get(("limits", project))
        if rows is None:
            async with self.sessions() as session:
                rows = list(
                    await session.scalars(
                        select(ProjectLimit).where(ProjectLimit.project == project)
                    )
                )
                session.expunge_all()
            self.lookups.put(("limits", project), rows)
        return rows

    async def limits(self, project: str, model: str) -> Limits | None:
        return project_limits.for_model(await self.rows(project), model)

    async def admitting(
        self,
        key: ApiKey,
        body: ChatCompletionRequest,
        context_length: int | None,
        job_id: str,
    ) -> "asyncio.Future[dict[str, str]] | None":
        """`admit` started, for the caller to await once it has sent its own round trip; None
        if the project has no limit on interactive requests to the model (nothing to count)."""
        limits = await self.limits(key.project, body.model)
        if limits is None or not limits.interactive:
            return None
        return asyncio.ensure_future(self.admit(key, body, context_length, job_id, limits))

    async def admit(
        self,
        key: ApiKey,
        body: ChatCompletionRequest,
        context_length: int | None,
        job_id: str,
        limits: Limits | None = None,
    ) -> dict[str, str]:
        """Count `job_id` against its project's limits on its model; the `x-ratelimit-*` headers
        for its answer. RateLimitError (429) if a limit is reached: nothing is counted then."""
        limits = limits or await self.limits(key.project, body.model)
        if limits is None or not limits.interactive:
            return {}
        estimate = project_limits.estimate_tokens(body, context_length)
        found = await self._run(key.project, body.model, limits, estimate, job_id)
        refused, wait_ms = found[0], int(found[1])
        requests, tokens = _buckets(limits, found)
        headers = project_limits.headers(requests, tokens)
        if not refused:
            self.counted[job_id] = Counted(key.project, body.model, limits.tpm)
            if len(self.counted) > MOST_TRACKED:
                self.counted.pop(next(iter(self.counted)))
            return headers
        raise _refusal(refused, wait_ms, key.project, body.model, limits, estimate, tokens, headers)

    async def usage(self, project: str, model: str, limits: Limits) -> Usage:
        """The project's buckets on `model` now, without counting anything."""
        found = await self._run(project, model, limits, 0, "")
        requests, tokens = _buckets(limits, found)
        return Usage(requests, tokens, int(found[6]))

    async def _run(
        self, project: str, model: str, limits: Limits, estimate: int, job_id: str
    ) -> list[Any]:
        keys = [_key(project, model, w) for w in ("requests", "tokens", "jobs")]
        args = [WINDOW_MS, _arg(limits.rpm), _arg(limits.tpm), _arg(limits.max_concurrent)]
        try:
            found = await self._admit(
                keys=[*keys, IN_FLIGHT_KEYS, throttled.TOTALS_KEY],
                args=[
                    *args,
                    estimate,
                    job_id,
                    throttled.MINUTE_PREFIX,
                    throttled.field_of(project, model, ""),
                ],
            )
        except RedisError as exc:
            # Closed rather than open: a project's limits hold even while Redis is away.
            raise ServiceUnavailableError(
                "The project's rate limits cannot be checked right now; try again shortly."
            ) from exc
        return [_text(v) if isinstance(v, bytes | str) else v for v in found]

    def job_done(self, done: JobDone) -> None:
        """A job ended (the waiter heard it): release it if this process admitted it."""
        counted = self.counted.get(done.job_id)
        if counted is None:
            return
        used = None
        if done.outcome is not None and done.outcome.response is not None:
            used = (done.outcome.response.get("usage") or {}).get("total_tokens")
        self._start_release(done.job_id, used, read=done.outcome is None)

    def _start_release(self, job_id: str, used: int | None, read: bool) -> asyncio.Future[None]:
        task = self._releasing.get(job_id)
        if task is None:
            task = asyncio.ensure_future(self.release(job_id, used, read))
            self._releasing[job_id] = task
            task.add_done_callback(lambda _: self._releasing.pop(job_id, None))
        return task

    async def release(self, job_id: str, used: int | None = None, read: bool = False) -> None:
        """Release a job this process admitted: its place at once, its tokens corrected to
        `used` (read from its row with `read`); a job that did not succeed keeps its estimate."""
        counted = self.counted.pop(job_id, None)
        if counted is None:
            return
        try:
            if read and counted.tpm is not None:
                async with self.sessions() as session:
                    used = await session.scalar(select(Job.total_tokens).where(Job.id == job_id))
            await self._release_one(counted.project, counted.model, job_id, used, counted.tpm)
        except Exception as exc:
            # The sweep releases it.
            log.warning("could not release job %s from its limits: %s", job_id, exc)

    async def _release_one(
        self, project: str, model: str, job_id: str, used: int | None, tpm: int | None
    ) -> None:
        await self._release(
            keys=[_key(project, model, "tokens"), _key(project, model, "jobs")],
            args=[WINDOW_MS, job_id, -1 if used is None else used, _arg(tpm)],
        )

    async def sweep(self) -> int:
        """Release jobs in flight that have ended (or were never stored) but that no process
        released: their process died, or missed the notification. How many were released."""
        released = 0
        now_ms = int(time.time() * 1000)
        for raw in await self.redis.smembers(IN_FLIGHT_KEYS):
            jobs_key = _text(raw)
            entries = await self.redis.hgetall(jobs_key)
            # Redis' clock and this host's may differ a little: the grace covers it.
            old = [
                _text(job_id)
                for job_id, value in entries.items()
                if now_ms - int(_text(value).split(":")[1]) > SWEEP_GRACE_MS
            ]
            if not old:
                continue
            async with self.sessions() as session:
                rows = (
                    await session.execute(
                        select(Job.id, Job.status, Job.total_tokens).where(Job.id.in_(old))
                    )
                ).all()
            state = {row[0]: (row[1], row[2]) for row in rows}
            project, _, rest = jobs_key.removeprefix("ferry:limits:").partition("\x00")
            model = rest.removesuffix(":jobs")
            limits = await self.limits(project, model)
            tpm = limits.tpm if limits is not None else None
            for job_id in old:
                status, used = state.get(job_id, (None, None))
                if status is not None and not status.is_final:
                    continue
                self.counted.pop(job_id, None)
                await self._release_one(project, model, job_id, used, tpm)
                released += 1
        return released


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _buckets(limits: Limits, found: list[Any]) -> tuple[Bucket | None, Bucket | None]:
    requests = (
        Bucket(limits.rpm, int(found[2]), int(found[3]) / 1000) if limits.rpm is not None else None
    )
    tokens = (
        Bucket(limits.tpm, int(found[4]), int(found[5]) / 1000) if limits.tpm is not None else None
    )
    return requests, tokens


def _refusal(
    refused: str,
    wait_ms: int,
    project: str,
    model: str,
    limits: Limits,
    estimate: int,
    tokens: Bucket | None,
    headers: dict[str, str],
) -> RateLimitError:
    wait = wait_ms / 1000
    if refused == "requests":
        assert limits.rpm is not None
        message = project_limits.requests_refused(model, project, limits.rpm, wait)
        kind = "requests"
    elif refused == "concurrent":
        assert limits.max_concurrent is not None
        message = project_limits.concurrency_refused(model, project, limits.max_concurrent)
        kind = "requests"
    else:
        assert limits.tpm is not None and tokens is not None
        kind = "tokens"
        if wait_ms < 0:
            # More than a minute's worth: no wait lets it pass, and the openai SDK is told not
            # to retry it.
            message = project_limits.tokens_too_large(model, project, limits.tpm, estimate)
            return RateLimitError(
                message, type=kind, headers={**headers, "x-should-retry": "false"}
            )
        used = limits.tpm - tokens.remaining
        message = project_limits.tokens_refused(model, project, limits.tpm, used, estimate, wait)
    return RateLimitError(
        message, type=kind, headers={**headers, **project_limits.retry_after(wait)}
    )
