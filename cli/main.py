"""The `ferry` command: serve the API, run a worker, migrate, prepare the model, manage keys,
projects' limits and webhooks."""

import argparse
import sys
from pathlib import Path

from core.settings import DEFAULT_MODEL, CoreSettings


def _configure_logging(level: str = "INFO") -> None:
    """Every line through one handler: JSON objects, or text with FERRY_LOG_FORMAT=text."""
    from core import logs

    logs.configure(level, json=CoreSettings().log_format == "json")


def cmd_api(args: argparse.Namespace) -> None:
    import gc
    import math

    import uvicorn

    from api.app import create_app
    from core.settings import ApiSettings

    settings = ApiSettings()
    host = args.host or settings.host
    port = args.port or settings.port
    _configure_logging(args.log_level)
    app = create_app(settings)
    # What is loaded by now lives as long as the process: kept out of the garbage collector's
    # full passes, which would otherwise walk all of it, holding the event loop 100 ms or more
    # each time (every second or two while a large batch file validates).
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=args.log_level.lower(),
        # No logging config of uvicorn's own: its error and access lines reach core.logs' handler.
        log_config=None,
        # On SIGTERM: no new connections; requests in flight get this long to finish.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_seconds),
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from core.settings import WorkerSettings
    from workers.main import run, self_check_only

    overrides = {
        name: value
        for name, value in {
            "model": args.model,
            "model_path": args.model_path,
            "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len,
            "dtype": args.dtype,
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cpu_kv_cache_gib": args.kv_cache_gib,
            "enforce_eager": args.enforce_eager,
            "engine_args": args.engine_args,
            "chat_template": args.chat_template,
            "tool_call_parser": args.tool_call_parser,
            "capabilities": args.capabilities,
        }.items()
        if value is not None
    }
    _configure_logging(args.log_level)
    if args.self_check:
        self_check_only(WorkerSettings(**overrides))
        return
    run(WorkerSettings(**overrides), loglevel=args.log_level)


def alembic_config(database_url: str):
    """Alembic's configuration for the packaged migrations, wherever Ferry is run from."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    from alembic import command

    from core.db import ensure_database

    settings = CoreSettings()
    if ensure_database(settings.database_url):
        print("created the database")
    command.upgrade(alembic_config(settings.database_url), args.revision)
    print(f"database at {args.revision}")


def cmd_model_prepare(args: argparse.Namespace) -> None:
    from workers.model_prep import prepare_default_model

    _configure_logging("WARNING")
    print(prepare_default_model(CoreSettings().cache_dir))


def _key_sessions():
    from core.db import sync_engine, sync_sessions

    return sync_sessions(sync_engine(CoreSettings().database_url, pool_size=1))


def cmd_keys_create(args: argparse.Namespace) -> None:
    from sqlalchemy.dialects.postgresql import insert

    from core.ids import new_id
    from core.keys import hash_key, new_key
    from core.tables import ApiKey, Project

    key = new_key()
    with _key_sessions().begin() as session:
        # A project is made by its first key if `ferry projects create` has not made it.
        session.execute(insert(Project).values(name=args.project).on_conflict_do_nothing())
        row = ApiKey(
            id=new_id("key"),
            name=args.name,
            project=args.project,
            key_hash=hash_key(key),
            key_prefix=key[:14],
            admin=args.admin,
        )
        session.add(row)
    kind = "admin key" if args.admin else "key"
    print(f"created {kind} {row.id} ({args.name}, project {args.project}); it is shown only once:")
    print(key)


def cmd_keys_list(args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from core.tables import ApiKey

    with _key_sessions()() as session:
        for key in session.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            role = "admin" if key.admin else "project"
            print(f"{key.id}\t{key.name}\t{key.project}\t{key.key_prefix}...\t{state}\t{role}")


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from sqlalchemy import func, update

    from core.tables import ApiKey

    with _key_sessions().begin() as session:
        done = session.execute(
            update(ApiKey)
            .where(ApiKey.id == args.id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        ).rowcount
    if not done:
        sys.exit(f"no active key {args.id}")
    _lookups_changed()
    print(f"revoked {args.id}")


def cmd_projects_create(args: argparse.Namespace) -> None:
    from sqlalchemy.dialects.postgresql import insert

    from core.tables import Project

    with _key_sessions().begin() as session:
        made = session.execute(
            insert(Project)
            .values(name=args.name, weight=args.weight)
            .on_conflict_do_nothing()
            .returning(Project.name)
        ).first()
    if made is None:
        sys.exit(f"project {args.name} exists already")
    print(f"created project {args.name} (no limits: `ferry projects limits` sets them)")


def _weight(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("a weight is a whole number, at least 1")
    return number


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# How long things are kept: `--completions-ttl` sets `completions_ttl_seconds`, and so on.
_RETENTION = ("completions_ttl", "file_ttl", "batch_output_ttl")


def _duration(value: str) -> int | str:
    """Seconds, from `3600`, `90m`, `12h` or `30d`; 'none' (kept until deleted)."""
    if value.lower() in (_NONE, "forever"):
        return _NONE
    unit = _UNITS.get(value[-1:].lower())
    seconds = int(value[:-1] if unit else value) * (unit or 1)
    if seconds < 3600:
        raise argparse.ArgumentTypeError("at least an hour (3600, 60m, 1h), or 'none'")
    return seconds


def _duration_text(seconds: int | None) -> str:
    if seconds is None:
        return "none"
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def _settings_text(project) -> str:
    kept = ", ".join(
        f"{name.replace('_', '-')} {_duration_text(getattr(project, name + '_seconds'))}"
        for name in _RETENTION
    )
    return f"weight {project.weight}, {kept}"


def cmd_projects_set(args: argparse.Namespace) -> None:
    from core.tables import Project

    with _key_sessions().begin() as session:
        project = session.get(Project, args.name, with_for_update=True)
        if project is None:
            sys.exit(f"no project {args.name}; `ferry projects create {args.name}` makes it")
        if args.weight is not None:
            project.weight = args.weight
        for name in _RETENTION:
            value = getattr(args, name)
            if value is not None:
                setattr(project, name + "_seconds", None if value == _NONE else value)
        shown = f"{project.name}: {_settings_text(project)}"
    print(shown)


# What `--rpm none` (or any limit given as none) means: back to no limit.
_NONE = "none"


def _limit(value: str) -> int | str:
    if value.lower() in (_NONE, "unlimited"):
        return _NONE
    number = int(value.replace("_", "").replace(",", ""))
    if number < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1 (or 'none': no limit)")
    return number


def cmd_projects_limits(args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from core.project_limits import NAMES
    from core.tables import Project, ProjectLimit

    given = {name: getattr(args, name) for name in NAMES if getattr(args, name) is not None}
    with _key_sessions().begin() as session:
        if session.get(Project, args.name, with_for_update=True) is None:
            sys.exit(f"no project {args.name}; `ferry projects create {args.name}` makes it")
        rows = {
            row.model: row
            for row in session.scalars(
                select(ProjectLimit).where(ProjectLimit.project == args.name)
            )
        }
        row = rows.get(args.model)
        if row is None:
            # A model's own row starts as what applied to it: the project-wide row.
            wide = rows.get(None)
            start = {name: getattr(wide, name) for name in NAMES} if wide is not None else {}
            row = ProjectLimit(project=args.name, model=args.model, **start)
            session.add(row)
        for name, value in given.items():
            setattr(row, name, None if value == _NONE else value)
    _lookups_changed("limits")
    print(f"{args.name} {args.model or '(each model)'}: {_limits_text(row)}")


def _limits_text(row) -> str:
    from core.project_limits import NAMES

    values = {name: getattr(row, name) for name in NAMES}
    return ", ".join(
        f"{name.replace('_', '-')} {'none' if value is None else value}"
        for name, value in values.items()
    )


def cmd_projects_show(args: argparse.Namespace) -> None:
    from sqlalchemy import func, select

    from core.tables import ApiKey, Project, ProjectLimit

    with _key_sessions()() as session:
        query = select(Project).order_by(Project.name)
        if args.name is not None:
            query = query.where(Project.name == args.name)
        projects = list(session.scalars(query))
        if args.name is not None and not projects:
            sys.exit(f"no project {args.name}")
        for project in projects:
            keys = session.scalar(
                select(func.count())
                .select_from(ApiKey)
                .where(ApiKey.project == project.name, ApiKey.revoked_at.is_(None))
            )
            print(f"{project.name}\t{keys} active keys\t{_settings_text(project)}")
            rows = session.scalars(
                select(ProjectLimit)
                .where(ProjectLimit.project == project.name)
                .order_by(ProjectLimit.model.nulls_first())
            ).all()
            if not rows:
                print("  no limits")
            for row in rows:
                print(f"  {row.model or '(each model)'}: {_limits_text(row)}")


def _lookups_changed(what: str = "keys") -> None:
    """Tell API processes to forget the keys and limits they cached (else they do within
    seconds)."""
    import redis

    from core.bus import LookupsChanged, publish
    from core.settings import CoreSettings

    try:
        publish(redis.Redis.from_url(CoreSettings().redis_url), LookupsChanged(what))
    except redis.RedisError as exc:
        print(f"(Redis unreachable: {exc}; API processes see the change within seconds)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", help="default: FERRY_HOST or 127.0.0.1")
    api.add_argument("--port", type=int, help="default: FERRY_PORT or 8000")
    api.add_argument("--log-level", default="INFO")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a worker that serves one model")
    worker.add_argument("--model", help=f"served model name (default: {DEFAULT_MODEL})")
    worker.add_argument("--model-path", help="model folder (default: the prepared default model)")
    worker.add_argument("--max-num-seqs", type=int, help="requests held in the engine at once")
    worker.add_argument("--max-model-len", type=int, help="context length")
    worker.add_argument(
        "--dtype",
        help="weights' dtype: auto (the model's own), bfloat16, float16, float32 "
        "(default: float32 on CPU builds, auto on GPUs)",
    )
    worker.add_argument("--tensor-parallel-size", type=int, help="GPUs per engine")
    worker.add_argument("--gpu-memory-utilization", type=float, help="GPU memory share, 0..1")
    worker.add_argument("--kv-cache-gib", type=int, help="KV cache in GiB (CPU builds)")
    worker.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        help="no torch.compile or CUDA graphs (default: eager on CPU builds, compiled on GPUs)",
    )
    worker.add_argument("--chat-template", help="chat template file (default: the model's)")
    worker.add_argument("--tool-call-parser", help="vLLM tool parser for tool_choice auto")
    worker.add_argument("--engine-args", help="more vLLM engine arguments, as one string")
    worker.add_argument(
        "--capabilities",
        help="optional features the model supports, comma-separated: "
        "reasoning, audio, verbosity, web_search, moderation",
    )
    worker.add_argument(
        "--self-check",
        action="store_true",
        help="load the engine, run only its known-answer check, and exit (code 4 if it fails)",
    )
    worker.add_argument("--log-level", default="INFO")
    worker.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    upgrade = db.add_parser("upgrade", help="create the database if needed and migrate it")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(func=cmd_db_upgrade)

    model = sub.add_parser("model", help="models").add_subparsers(dest="model", required=True)
    prepare = model.add_parser("prepare", help="build the default model's folder; prints its path")
    prepare.set_defaults(func=cmd_model_prepare)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key; prints it once, on the last line")
    create.add_argument("name")
    create.add_argument("--project", default="default")
    create.add_argument(
        "--admin",
        action="store_true",
        help="the dashboard shows this key the whole fleet: every worker, every project's "
        "queues and throughput (other keys see their project's)",
    )
    create.set_defaults(func=cmd_keys_create)
    keys.add_parser(
        "list", help="list keys: id, name, project, prefix, state, admin or project"
    ).set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("id")
    revoke.set_defaults(func=cmd_keys_revoke)

    projects = sub.add_parser("projects", help="projects and their limits").add_subparsers(
        dest="projects", required=True
    )
    pcreate = projects.add_parser("create", help="create a project (with no limits)")
    pcreate.add_argument("name")
    weight_help = (
        "its share of a model's batch work while other projects have some queued too "
        "(default 1; a project of weight 2 gets twice the share of one of weight 1)"
    )
    pcreate.add_argument("--weight", type=_weight, default=1, help=weight_help)
    pcreate.set_defaults(func=cmd_projects_create)
    pset = projects.add_parser(
        "set",
        help="change a project's weight and retention; each not given stays as it was",
        description="Workers read a changed weight within 10 seconds. Durations: seconds, or "
        "with a unit (90m, 12h, 30d), at least an hour; 'none' keeps until deleted (the "
        "default).",
    )
    pset.add_argument("name")
    pset.add_argument("--weight", type=_weight, help=weight_help)
    for flag, what in (
        ("--completions-ttl", "how long stored completions are kept after they are created"),
        ("--file-ttl", "when uploads without `expires_after` expire, after their upload"),
        (
            "--batch-output-ttl",
            "when batch output and error files expire, after they are written, for batches "
            "created without `output_expires_after`",
        ),
    ):
        pset.add_argument(flag, type=_duration, metavar="DURATION|none", help=what)
    pset.set_defaults(func=cmd_projects_set)
    plimits = projects.add_parser(
        "limits",
        help="set a project's limits; each not given stays as it was, 'none' removes one",
        description="Without --model, the limits apply to each model the project uses, each "
        "counted on its own; with --model, to that model instead. A limit not given stays as "
        "it was; 'none' removes it. API processes apply a change within seconds.",
    )
    plimits.add_argument("name")
    plimits.add_argument("--model", help="the model these limits are for (default: each model)")
    for flag, what in (
        ("--rpm", "interactive requests per minute"),
        ("--tpm", "their tokens per minute (prompt and completion)"),
        ("--max-concurrent", "interactive requests queued or running at once"),
        ("--batch-queue-tokens", "tokens the project's batches in progress may hold"),
    ):
        plimits.add_argument(flag, type=_limit, metavar="N|none", help=what)
    plimits.set_defaults(func=cmd_projects_limits)
    pshow = projects.add_parser("show", help="a project's limits, or every project's")
    pshow.add_argument("name", nargs="?")
    pshow.set_defaults(func=cmd_projects_show)

    from cli.batch import add_parser as add_batch_parser

    add_batch_parser(sub)
    from cli.webhooks import add_parser as add_webhooks_parser

    add_webhooks_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
