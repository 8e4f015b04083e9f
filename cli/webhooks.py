"""`ferry webhooks`: projects' webhook endpoints, their secrets, what was sent to them, and the
secret that signs asynchronous completions' one-off callbacks.

Talks to Postgres directly, as `ferry keys` does; secrets are sealed with FERRY_SECRET_KEY, which
must be the API processes' own. Every command takes `--json`: one JSON object or array on
standard output.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

EXIT_USAGE = 2
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class WebhookCliError(Exception):
    """A failure reported on one line, without a traceback, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _sessions():
    from core.db import sync_engine, sync_sessions
    from core.settings import CoreSettings

    return sync_sessions(sync_engine(CoreSettings().database_url, pool_size=1))


def _settings():
    from core.settings import CoreSettings

    return CoreSettings()


def _events(value: str) -> list[str] | None:
    from core.webhooks import parse_events

    try:
        return parse_events(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _grace(value: str) -> timedelta:
    """`24h`, `90m`, `3600` (seconds), `0` (the old secret stops signing at once)."""
    unit = _UNITS.get(value[-1:].lower())
    try:
        seconds = int(value[:-1] if unit else value) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError("a duration: seconds, or 90m, 24h, 7d") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("a duration is not negative")
    return timedelta(seconds=seconds)


def _unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _seal(secret: str) -> str:
    from core.webhooks import WebhookSettingsError, seal

    try:
        return seal(secret, _settings())
    except WebhookSettingsError as exc:
        raise WebhookCliError(str(exc), EXIT_USAGE) from None


def _endpoint_view(endpoint: Any, now: datetime) -> dict[str, Any]:
    is_open = endpoint.circuit_open_until is not None and endpoint.circuit_open_until > now
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "project": endpoint.project,
        "events": endpoint.events,
        "created_at": _unix(endpoint.created_at),
        "circuit": "open" if is_open else "closed",
        "consecutive_failures": endpoint.consecutive_failures,
    }


def cmd_add(args: argparse.Namespace) -> None:
    import secrets

    from sqlalchemy.dialects.postgresql import insert

    from core.tables import Project, WebhookEndpoint
    from core.webhooks import RefusedUrl, WebhookSettingsError, check_url, new_secret

    try:
        check_url(args.url, _settings())
    except (RefusedUrl, WebhookSettingsError) as exc:
        raise WebhookCliError(f"refused: {exc}", EXIT_USAGE) from None
    secret = new_secret()
    endpoint = WebhookEndpoint(
        id=f"we_{secrets.token_hex(12)}",
        project=args.project,
        url=args.url,
        events=args.events,
        secret_sealed=_seal(secret),
    )
    with _sessions().begin() as session:
        # A project is made by its first endpoint, as by its first key.
        session.execute(insert(Project).values(name=args.project).on_conflict_do_nothing())
        session.add(endpoint)
    events = ", ".join(args.events) if args.events else "every event"
    _out(
        args,
        {
            "id": endpoint.id,
            "url": endpoint.url,
            "project": endpoint.project,
            "events": endpoint.events,
            "secret": secret,
        },
        f"created webhook endpoint {endpoint.id} for project {args.project}: {args.url} "
        f"({events}); its signing secret is shown only once:\n{secret}",
    )


def cmd_list(args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from core.tables import WebhookEndpoint

    query = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if args.project is not None:
        query = query.where(WebhookEndpoint.project == args.project)
    now = datetime.now(UTC)
    with _sessions()() as session:
        rows = [_endpoint_view(endpoint, now) for endpoint in session.scalars(query)]
    lines = [
        f"{row['id']}\t{row['project']}\t{row['url']}\t"
        f"{','.join(row['events']) if row['events'] else 'all events'}\t"
        f"circuit {row['circuit']}\t{row['consecutive_failures']} failures in a row"
        for row in rows
    ]
    _out(args, rows, "\n".join(lines) if lines else "no webhook endpoints")


def cmd_remove(args: argparse.Namespace) -> None:
    from sqlalchemy import delete

    from core.tables import WebhookEndpoint

    with _sessions().begin() as session:
        gone = session.execute(
            delete(WebhookEndpoint).where(WebhookEndpoint.id == args.id)
        ).rowcount
    if not gone:
        raise WebhookCliError(f"no webhook endpoint {args.id}")
    _out(args, {"id": args.id, "deleted": True}, f"removed {args.id}")


def cmd_rotate(args: argparse.Namespace) -> None:
    from core.tables import WebhookEndpoint
    from core.webhooks import new_secret

    secret = new_secret()
    sealed = _seal(secret)
    with _sessions().begin() as session:
        endpoint = session.get(WebhookEndpoint, args.id, with_for_update=True)
        if endpoint is None:
            raise WebhookCliError(f"no webhook endpoint {args.id}")
        until = datetime.now(UTC) + args.grace
        endpoint.previous_secret_sealed = endpoint.secret_sealed
        endpoint.previous_secret_until = until
        endpoint.secret_sealed = sealed
    _out(
        args,
        {"id": args.id, "secret": secret, "previous_secret_expires_at": _unix(until)},
        f"rotated {args.id}; the previous secret also signs until {until:%Y-%m-%d %H:%M:%S} "
        f"UTC. The new secret is shown only once:\n{secret}",
    )


def _outcome(status_code: int | None, error: str | None) -> str:
    if status_code is not None and 200 <= status_code < 300:
        return "delivered"
    if error is not None and error.startswith("refused"):
        return "refused"
    return "failed"


def cmd_deliveries(args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent

    with _sessions()() as session:
        if session.get(WebhookEndpoint, args.id) is None:
            raise WebhookCliError(f"no webhook endpoint {args.id}")
        rows = session.execute(
            select(
                WebhookDelivery.event_id,
                WebhookEvent.type,
                WebhookAttempt.attempt,
                WebhookAttempt.started_at,
                WebhookAttempt.status_code,
                WebhookAttempt.error,
                WebhookAttempt.duration_ms,
            )
            .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.endpoint_id == args.id)
            .order_by(WebhookAttempt.started_at.desc(), WebhookAttempt.id.desc())
            .limit(args.limit)
        ).all()
    data = [
        {
            "event_id": row.event_id,
            "type": row.type,
            "attempt": row.attempt,
            "started_at": _unix(row.started_at),
            "status_code": row.status_code,
            "error": row.error,
            "outcome": _outcome(row.status_code, row.error),
        }
        for row in rows
    ]
    lines = [
        f"{row.started_at:%Y-%m-%d %H:%M:%S}\t{row.event_id}\t{row.type}\tattempt {row.attempt}"
        f"\t{_outcome(row.status_code, row.error)}\t"
        f"{row.status_code if row.status_code is not None else row.error}\t{row.duration_ms} ms"
        for row in rows
    ]
    _out(args, data, "\n".join(lines) if lines else f"nothing sent to {args.id} yet")


def cmd_redeliver(args: argparse.Namespace) -> None:
    from sqlalchemy import select, text

    from core.tables import WebhookDelivery, WebhookEndpoint, WebhookEvent

    with _sessions().begin() as session:
        event = session.get(WebhookEvent, args.event_id)
        if event is None:
            raise WebhookCliError(f"no webhook event {args.event_id}")
        before = session.execute(
            select(WebhookDelivery.endpoint_id, WebhookDelivery.callback_url)
            .where(WebhookDelivery.event_id == event.id)
            .distinct()
        ).all()
        live = set(
            session.scalars(
                select(WebhookEndpoint.id).where(WebhookEndpoint.project == event.project)
            )
        )
        targets = [
            (endpoint_id, callback_url)
            for endpoint_id, callback_url in before
            if endpoint_id in live or (endpoint_id is None and callback_url is not None)
        ]
        for endpoint_id, callback_url in targets:
            session.add(
                WebhookDelivery(
                    event_id=event.id, endpoint_id=endpoint_id, callback_url=callback_url
                )
            )
        session.flush()
        session.execute(text("SELECT pg_notify('ferry_webhooks', :id)"), {"id": event.id})
    _out(
        args,
        {"event_id": event.id, "deliveries": len(targets)},
        f"{event.id} ({event.type}) queued again for {len(targets)} destination(s)",
    )


def cmd_callback_secret(args: argparse.Namespace) -> None:
    from sqlalchemy.dialects.postgresql import insert

    from core.tables import Project
    from core.webhooks import new_secret

    secret = new_secret()
    sealed = _seal(secret)
    with _sessions().begin() as session:
        session.execute(insert(Project).values(name=args.project).on_conflict_do_nothing())
        project = session.get(Project, args.project, with_for_update=True)
        assert project is not None
        rotated = project.callback_secret_sealed is not None
        until = datetime.now(UTC) + args.grace
        if rotated:
            project.callback_previous_secret_sealed = project.callback_secret_sealed
            project.callback_previous_secret_until = until
        project.callback_secret_sealed = sealed
    what = (
        f"rotated the callback secret of project {args.project} (the previous one also signs "
        f"until {until:%Y-%m-%d %H:%M:%S} UTC)"
        if rotated
        else f"created the callback secret of project {args.project}"
    )
    _out(
        args,
        {"project": args.project, "secret": secret},
        f"{what}; it signs the events sent to Ferry-Callback-URL and is shown only once:\n{secret}",
    )


def _run(func):
    def run(args: argparse.Namespace) -> None:
        try:
            func(args)
        except WebhookCliError as exc:
            print(f"ferry webhooks: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return run


def add_parser(sub: Any) -> None:
    """Register `ferry webhooks` and its subcommands on `ferry`'s subparsers."""
    from core.webhooks import EVENT_TYPES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object or array")
    hooks = sub.add_parser(
        "webhooks",
        help="webhook endpoints: signed events when batches and asynchronous completions end",
    )
    commands = hooks.add_subparsers(dest="webhooks", required=True)

    add = commands.add_parser(
        "add",
        parents=[common],
        help="send a project's events to URL; prints its signing secret once",
        description="Refused: URLs that are not http(s), and hosts that resolve to loopback, "
        "private, link-local or reserved addresses unless FERRY_WEBHOOK_ALLOWED_NETWORKS "
        "allows them (exit code 2).",
    )
    add.add_argument("url")
    add.add_argument("--project", default="default")
    add.add_argument(
        "--events",
        type=_events,
        help=f"comma-separated event types (default: every one): {', '.join(EVENT_TYPES)}",
    )
    add.set_defaults(func=_run(cmd_add))

    list_ = commands.add_parser("list", parents=[common], help="endpoints (never their secrets)")
    list_.add_argument("--project")
    list_.set_defaults(func=_run(cmd_list))

    remove = commands.add_parser("remove", parents=[common], help="remove an endpoint")
    remove.add_argument("id")
    remove.set_defaults(func=_run(cmd_remove))

    grace_help = "how long the previous secret also signs (default 24h; 0: not at all)"
    rotate = commands.add_parser(
        "rotate",
        parents=[common],
        help="give an endpoint a new secret; the old one also signs for a grace period",
    )
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=_grace, default=timedelta(hours=24), help=grace_help)
    rotate.set_defaults(func=_run(cmd_rotate))

    deliveries = commands.add_parser(
        "deliveries", parents=[common], help="an endpoint's delivery attempts, newest first"
    )
    deliveries.add_argument("id")
    deliveries.add_argument("--limit", type=int, default=50)
    deliveries.set_defaults(func=_run(cmd_deliveries))

    redeliver = commands.add_parser(
        "redeliver",
        parents=[common],
        help="send an event again (same webhook-id) to where it was sent",
    )
    redeliver.add_argument("event_id")
    redeliver.set_defaults(func=_run(cmd_redeliver))

    callback = commands.add_parser(
        "callback-secret",
        parents=[common],
        help="create (or rotate) the secret that signs a project's Ferry-Callback-URL events; "
        "prints it once",
    )
    callback.add_argument("--project", default="default")
    callback.add_argument("--grace", type=_grace, default=timedelta(hours=24), help=grace_help)
    callback.set_defaults(func=_run(cmd_callback_secret))
