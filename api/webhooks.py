"""The webhook sender: every API process runs one; each delivery is taken by one of them.

Triggers write an event and its deliveries (the outbox) in the transaction that ends a batch or
an asynchronous completion, then notify `ferry_webhooks` (migration 0014). The sender wakes on
that notification, or every POLL_SECONDS, and takes the deliveries that are due with
`FOR UPDATE SKIP LOCKED`, leasing them for LEASE_SECONDS: another process takes none of them
while the lease runs, and takes them again once it has run out if this process died. Each is
then sent in a task of its own, at most PER_ENDPOINT at once per endpoint, so that a slow or
dead receiver holds up nobody else's events.

An attempt posts the event's body, signed (core.webhooks), to an address its URL resolves to
now and that is checked now (not resolved again by the HTTP client), with no redirects followed
and a 10 s limit. Any 2xx delivers it; anything else is recorded and tried again after an
exponential, jittered wait, until 72 hours after the event. After BREAKER_FAILURES failures in a
row an endpoint's circuit opens: nothing is retried for a while (a new event still gets its first
attempt), then one delivery probes it; when that succeeds, everything it missed is sent at once.
Postgres or a receiver going away only delays things: the loop logs and carries on.
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from sqlalchemy import make_url, text

from api.context import ApiContext
from api.metrics import WEBHOOK_DELIVERIES
from core import webhooks
from core.webhooks import RefusedUrl, WebhookSettingsError

log = logging.getLogger(__name__)

CHANNEL = "ferry_webhooks"
# Without a notification, how often the outbox is looked at.
POLL_SECONDS = 5.0
# How long a taken delivery is this process's: past the attempt's limit, with room to record it.
LEASE_SECONDS = 30
# Deliveries in flight per endpoint (or callback URL) and in all, per API process.
PER_ENDPOINT = 4
MAX_IN_FLIGHT = 64
# How often deliveries past 72 hours are given up.
GIVE_UP_EVERY_SECONDS = 60.0

# Due deliveries, at most PER_ENDPOINT of each endpoint (or callback URL), so that one with a
# backlog does not crowd out the others; none of those this process has as many in flight for.
# A delivery's first attempt goes even while its endpoint's circuit is open (a new event costs a
# dead receiver one attempt; its retries wait for the circuit); once the circuit's time is up,
# any of the endpoint's deliveries may be its probe.
_CANDIDATES = text(
    """
    WITH ranked AS (
        SELECT d.id, d.next_attempt_at,
               row_number() OVER (
                   PARTITION BY coalesce(d.endpoint_id, 'callback ' || d.callback_url)
                   ORDER BY d.next_attempt_at, d.id) AS n
        FROM webhook_deliveries d
        LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
        WHERE d.status = 'pending'
          AND (d.lease_until IS NULL OR d.lease_until < now())
          AND NOT (coalesce(d.endpoint_id, 'callback ' || d.callback_url)
                   = ANY (CAST(:busy AS text[])))
          AND (d.attempts = 0
               OR (d.next_attempt_at <= now()
                   AND NOT coalesce(e.circuit_open_until > now(), false))
               OR (e.consecutive_failures >= :breaker
                   AND NOT coalesce(e.circuit_open_until > now(), false)))
    ), picked AS (
        SELECT id FROM ranked WHERE n <= :per_endpoint ORDER BY next_attempt_at LIMIT :limit
    )
    SELECT d.id, d.endpoint_id, d.callback_url,
           coalesce(e.consecutive_failures >= :breaker
                    AND NOT coalesce(e.circuit_open_until > now(), false), false) AS probe
    FROM webhook_deliveries d
    LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
    WHERE d.id IN (SELECT id FROM picked)
      AND d.status = 'pending'
      AND (d.lease_until IS NULL OR d.lease_until < now())
    ORDER BY d.next_attempt_at
    FOR UPDATE OF d SKIP LOCKED
    """
)
# A half-open circuit lets one probe through: the process that marks it open again sends it.
_TAKE_PROBE = text(
    """
    UPDATE webhook_endpoints SET circuit_open_until = now() + make_interval(secs => :seconds)
    WHERE id = :id AND (circuit_open_until IS NULL OR circuit_open_until <= now())
    RETURNING id
    """
)
_LEASE = text(
    """
    UPDATE webhook_deliveries SET lease_until = now() + make_interval(secs => :seconds)
    WHERE id = ANY (CAST(:ids AS bigint[]))
    """
)
_DETAILS = text(
    """
    SELECT d.id, d.event_id, d.attempts, d.endpoint_id, coalesce(d.callback_url, e.url) AS url,
           ev.payload, ev.created_at AS event_created_at,
           coalesce(e.secret_sealed, p.callback_secret_sealed) AS sealed,
           CASE WHEN e.id IS NULL THEN p.callback_previous_secret_sealed
                ELSE e.previous_secret_sealed END AS previous_sealed,
           CASE WHEN e.id IS NULL THEN p.callback_previous_secret_until
                ELSE e.previous_secret_until END AS previous_until
    FROM webhook_deliveries d
    JOIN webhook_events ev ON ev.id = d.event_id
    LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
    LEFT JOIN projects p ON p.name = ev.project
    WHERE d.id = ANY (CAST(:ids AS bigint[]))
    """
)
_RECORD_ATTEMPT = text(
    """
    INSERT INTO webhook_attempts
        (delivery_id, attempt, started_at, duration_ms, status_code, error, response_body)
    VALUES (:delivery_id, :attempt, :started_at, :duration_ms, :status_code, :error, :body)
    """
)
_DELIVERED = text(
    """
    UPDATE webhook_deliveries
    SET status = 'delivered', attempts = :attempt, delivered_at = now(), lease_until = NULL
    WHERE id = :id
    """
)
_RETRY = text(
    """
    UPDATE webhook_deliveries
    SET status = :status, attempts = :attempt, lease_until = NULL,
        next_attempt_at = now() + make_interval(secs => :wait)
    WHERE id = :id
    """
)
# A success closes the circuit; after failures, what waited for the receiver is due at once.
_ENDPOINT_OK = text(
    """
    WITH before AS (
        SELECT consecutive_failures FROM webhook_endpoints WHERE id = :id FOR UPDATE
    ), closed AS (
        UPDATE webhook_endpoints
        SET consecutive_failures = 0, circuit_open_until = NULL
        WHERE id = :id
        RETURNING id
    )
    UPDATE webhook_deliveries SET next_attempt_at = now()
    WHERE endpoint_id = (SELECT id FROM closed) AND status = 'pending'
      AND next_attempt_at > now() AND (SELECT consecutive_failures FROM before) > 0
    """
)
_ENDPOINT_FAILED = text(
    """
    UPDATE webhook_endpoints
    SET consecutive_failures = consecutive_failures + 1, last_failure_at = now()
    WHERE id = :id
    RETURNING consecutive_failures
    """
)
_OPEN_CIRCUIT = text("UPDATE webhook_endpoints SET circuit_open_until = :until WHERE id = :id")
_GIVE_UP = text(
    """
    UPDATE webhook_deliveries d SET status = 'failed', lease_until = NULL
    FROM webhook_events ev
    WHERE ev.id = d.event_id AND d.status = 'pending' AND ev.created_at < :cutoff
      AND (d.lease_until IS NULL OR d.lease_until < now())
    RETURNING d.id
    """
)


@dataclass
class Claimed:
    """A delivery this process has leased, with what sending it needs."""

    id: int
    event_id: str
    attempt: int
    endpoint_id: str | None
    url: str
    payload: dict[str, Any]
    event_created_at: datetime
    sealed: str | None
    previous_sealed: str | None
    previous_until: datetime | None

    @property
    def key(self) -> str:
        """What its concurrency is counted by: its endpoint, or its callback URL."""
        return self.endpoint_id or f"callback {self.url}"


@dataclass
class Outcome:
    """What one attempt came to: the receiver's status and the start of its answer, or why
    there was none."""

    status_code: int | None
    error: str | None
    body: str | None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def listen_url(database_url: str) -> str:
    """The database URL as psycopg takes it (without SQLAlchemy's driver name)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


class Sender:
    """This process's sender: takes due deliveries, sends each in a task of its own."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.wake = asyncio.Event()
        self.in_flight: Tally[str] = Tally()
        self.tasks: set[asyncio.Task] = set()
        self.client = httpx.AsyncClient(
            timeout=webhooks.ATTEMPT_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
        )
        self._gave_up_at = 0.0

    async def forever(self) -> None:
        """Send what is due, whenever it is due, until cancelled."""
        try:
            webhooks.allowed_networks(self.ctx.settings)
            if not self.ctx.settings.secret_key.get_secret_value():
                raise WebhookSettingsError("FERRY_SECRET_KEY is not set")
        except WebhookSettingsError as exc:
            log.error("webhooks are not sent by this process: %s", exc)
            return
        listener = asyncio.create_task(self._listen_forever())
        try:
            while True:
                self.wake.clear()
                try:
                    await self._give_up_old()
                    taken = await self.claim()
                except Exception as exc:
                    log.warning("webhooks: the outbox is unavailable: %s", exc)
                    taken = []
                for delivery in taken:
                    self._start(delivery)
                if taken and self._room():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)
        finally:
            listener.cancel()
            for task in list(self.tasks):
                task.cancel()
            await self.client.aclose()

    def _room(self) -> int:
        return MAX_IN_FLIGHT - sum(self.in_flight.values())

    def _start(self, delivery: Claimed) -> None:
        self.in_flight[delivery.key] += 1
        task = asyncio.create_task(self.deliver(delivery))
        self.tasks.add(task)

        def done(task: asyncio.Task) -> None:
            self.tasks.discard(task)
            self.in_flight[delivery.key] -= 1
            if self.in_flight[delivery.key] <= 0:
                del self.in_flight[delivery.key]
            # A place is free: more may be taken now.
            self.wake.set()

        task.add_done_callback(done)

    async def _listen_forever(self) -> None:
        url = listen_url(self.ctx.settings.database_url)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever was notified while nobody listened is found now.
                    self.wake.set()
                    async for _ in conn.notifies():
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhooks: listening to Postgres failed (polling meanwhile): %s", exc)
            await asyncio.sleep(POLL_SECONDS)

    async def _give_up_old(self) -> None:
        if time.monotonic() - self._gave_up_at < GIVE_UP_EVERY_SECONDS:
            return
        cutoff = datetime.now(UTC) - webhooks.GIVE_UP_AFTER
        async with self.ctx.sessions.begin() as session:
            gone = (await session.execute(_GIVE_UP, {"cutoff": cutoff})).all()
        self._gave_up_at = time.monotonic()
        if gone:
            WEBHOOK_DELIVERIES.labels("gave_up").inc(len(gone))
            log.warning("webhooks: %d deliveries given up 72 hours after their event", len(gone))

    async def claim(self) -> list[Claimed]:
        """Take the deliveries that are due, as many as there is room for, and lease them."""
        room = self._room()
        if room <= 0:
            return []
        busy = [key for key, n in self.in_flight.items() if n >= PER_ENDPOINT]
        async with self.ctx.sessions.begin() as session:
            rows = (
                await session.execute(
                    _CANDIDATES,
                    {
                        "breaker": webhooks.BREAKER_FAILURES,
                        "busy": busy,
                        "per_endpoint": PER_ENDPOINT,
                        "limit": room,
                    },
                )
            ).all()
            chosen: list[int] = []
            per_key: Tally[str] = Tally()
            probed: set[str] = set()
            for delivery_id, endpoint_id, callback_url, probe in rows:
                if len(chosen) >= room:
                    break
                key = endpoint_id or f"callback {callback_url}"
                if self.in_flight[key] + per_key[key] >= PER_ENDPOINT:
                    continue
                if probe:
                    if endpoint_id in probed or self.in_flight[key] or per_key[key]:
                        continue
                    probed.add(endpoint_id)
                    taken = await session.execute(
                        _TAKE_PROBE,
                        {"id": endpoint_id, "seconds": webhooks.BREAKER_OPEN_SECONDS},
                    )
                    if taken.first() is None:
                        continue
                per_key[key] += 1
                chosen.append(delivery_id)
            if not chosen:
                return []
            await session.execute(_LEASE, {"ids": chosen, "seconds": LEASE_SECONDS})
            details = (await session.execute(_DETAILS, {"ids": chosen})).mappings().all()
        return [
            Claimed(
                id=row["id"],
                event_id=row["event_id"],
                attempt=row["attempts"] + 1,
                endpoint_id=row["endpoint_id"],
                url=row["url"],
                payload=row["payload"],
                event_created_at=row["event_created_at"],
                sealed=row["sealed"],
                previous_sealed=row["previous_sealed"],
                previous_until=row["previous_until"],
            )
            for row in details
        ]

    async def deliver(self, delivery: Claimed) -> None:
        """One attempt at a delivery, recorded."""
        started = datetime.now(UTC)
        clock = time.perf_counter()
        outcome = await self.attempt(delivery)
        duration_ms = int((time.perf_counter() - clock) * 1000)
        if outcome.delivered:
            WEBHOOK_DELIVERIES.labels("delivered").inc()
        elif outcome.refused:
            WEBHOOK_DELIVERIES.labels("refused").inc()
        else:
            WEBHOOK_DELIVERIES.labels("failed_attempt").inc()
        if not outcome.delivered:
            log.info(
                "webhooks: event %s to %s, attempt %d failed: %s",
                delivery.event_id,
                delivery.endpoint_id or "its callback URL",
                delivery.attempt,
                outcome.error or f"HTTP {outcome.status_code}",
            )
        # Postgres may be away for a moment: the lease leaves time to record the attempt; if
        # it cannot be, the delivery is sent again once the lease has run out.
        deadline = time.monotonic() + LEASE_SECONDS / 2
        while True:
            try:
                await self._record(delivery, outcome, started, duration_ms)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.warning("webhooks: attempt at %s not recorded: %s", delivery.id, exc)
                    return
                await asyncio.sleep(1.0)

    async def attempt(self, delivery: Claimed) -> Outcome:
        """Post the event once, signed, to the address its URL resolves to and passes now."""
        settings = self.ctx.settings
        try:
            if delivery.sealed is None:
                raise WebhookSettingsError(
                    "the project has no callback secret (`ferry webhooks callback-secret`)"
                )
            signing = webhooks.signing_secrets(
                delivery.sealed, delivery.previous_sealed, delivery.previous_until, settings
            )
        except WebhookSettingsError as exc:
            return Outcome(None, str(exc), None)
        try:
            target = await asyncio.to_thread(webhooks.check_url, delivery.url, settings)
        except RefusedUrl as exc:
            return Outcome(None, f"refused: {exc}", None, refused=True)
        body = webhooks.body_of(delivery.payload)
        headers = {
            "content-type": "application/json",
            "user-agent": "Ferry-Webhooks",
            "host": target.host_header,
            **webhooks.sign(delivery.event_id, datetime.now(UTC), body, signing),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            async with asyncio.timeout(webhooks.ATTEMPT_TIMEOUT_SECONDS):
                request = self.client.build_request(
                    "POST",
                    target.connect_url,
                    content=body.encode(),
                    headers=headers,
                    extensions=extensions,
                )
                response = await self.client.send(request, stream=True)
                try:
                    kept = await _head(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            return Outcome(None, "timed out after 10 s", None)
        except httpx.HTTPError as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:500], None)
        return Outcome(response.status_code, None, kept)

    async def _record(
        self, delivery: Claimed, outcome: Outcome, started: datetime, duration_ms: int
    ) -> None:
        async with self.ctx.sessions.begin() as session:
            await session.execute(
                _RECORD_ATTEMPT,
                {
                    "delivery_id": delivery.id,
                    "attempt": delivery.attempt,
                    "started_at": started,
                    "duration_ms": duration_ms,
                    "status_code": outcome.status_code,
                    "error": outcome.error,
                    "body": outcome.body,
                },
            )
            if outcome.delivered:
                await session.execute(_DELIVERED, {"id": delivery.id, "attempt": delivery.attempt})
                if delivery.endpoint_id is not None:
                    await session.execute(_ENDPOINT_OK, {"id": delivery.endpoint_id})
                return
            wait = webhooks.backoff_seconds(delivery.attempt)
            given_up = datetime.now(UTC) + timedelta(seconds=wait) > (
                delivery.event_created_at + webhooks.GIVE_UP_AFTER
            )
            await session.execute(
                _RETRY,
                {
                    "id": delivery.id,
                    "attempt": delivery.attempt,
                    "wait": wait,
                    "status": "failed" if given_up else "pending",
                },
            )
            if delivery.endpoint_id is not None:
                failures = (
                    await session.execute(_ENDPOINT_FAILED, {"id": delivery.endpoint_id})
                ).scalar_one_or_none()
                until = webhooks.circuit_open_until(failures or 0, datetime.now(UTC))
                if until is not None:
                    await session.execute(
                        _OPEN_CIRCUIT, {"id": delivery.endpoint_id, "until": until}
                    )
        if given_up:
            WEBHOOK_DELIVERIES.labels("gave_up").inc()


async def _head(response: httpx.Response) -> str:
    """At most KEPT_BODY_BYTES of the answer's body, as text; the rest is not read."""
    kept = b""
    async for chunk in response.aiter_raw():
        kept += chunk
        if len(kept) >= webhooks.KEPT_BODY_BYTES:
            break
    return webhooks.kept_text(kept)
