"""The database tables (SQLAlchemy 2). The schema itself comes from the Alembic migrations."""

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres; plain JSON elsewhere keeps the models importable without it.
Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ApiKey(Base):
    """A bearer key. Only its SHA-256 is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    project: Mapped[str] = mapped_column(String(200), default="default")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the key, to tell keys apart in listings.
    key_prefix: Mapped[str] = mapped_column(String(32))
    # An admin key also sees the whole fleet on the dashboard: every worker (host, pid), every
    # project's queues and throughput. Other keys see only their project's.
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = _now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Project(Base):
    """A team sharing this Ferry: its keys' jobs, files and batches, and its limits."""

    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Its share of a model's batch work while other projects have some queued (workers.fair_share).
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Retention (api.retention); None keeps until deleted. Stored completions go this long after
    # they were created; files uploaded without `expires_after`, and a batch's output and error
    # files when the batch gave no `output_expires_after`, expire this long after they were made.
    completions_ttl_seconds: Mapped[int | None] = mapped_column(BigInteger)
    file_ttl_seconds: Mapped[int | None] = mapped_column(BigInteger)
    batch_output_ttl_seconds: Mapped[int | None] = mapped_column(BigInteger)
    # The secret that signs its asynchronous completions' one-off callbacks (core.webhooks,
    # sealed), and during a rotation the one before it, which signs too until the time given.
    callback_secret_sealed: Mapped[str | None] = mapped_column(Text)
    callback_previous_secret_sealed: Mapped[str | None] = mapped_column(Text)
    callback_previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()


class ProjectLimit(Base):
    """A project's limits: for each model it uses (`model` None), or for one model, which then
    takes this row instead of the project-wide one. A None limit is no limit."""

    __tablename__ = "project_limits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.name", ondelete="CASCADE"))
    model: Mapped[str | None] = mapped_column(String(200))
    # Interactive requests per minute, their tokens per minute (prompt and completion), and
    # those queued or running at once.
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    # The tokens its batches in progress may hold, estimated when each batch is validated.
    batch_queue_tokens: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index(
            "uq_project_limits_project",
            "project",
            unique=True,
            postgresql_where=text("model IS NULL"),
        ),
        Index(
            "uq_project_limits_project_model",
            "project",
            "model",
            unique=True,
            postgresql_where=text("model IS NOT NULL"),
        ),
    )


class ServedModel(Base):
    """A model some worker has served: requests for it are accepted and queued."""

    __tablename__ = "served_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Optional request features the serving workers' model supports (see core.capabilities).
    capabilities: Mapped[list[str]] = mapped_column(Json, default=list, server_default="[]")
    # Changes when the model's files or the engine change (the response's system_fingerprint).
    system_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The serving workers' context length (tokens): what a request without max_tokens may get.
    max_model_len: Mapped[int | None] = mapped_column(Integer)
    first_served_at: Mapped[datetime] = _now_column()
    last_served_at: Mapped[datetime] = _now_column()


class BatchStatus(enum.StrEnum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


class StoredFile(Base):
    """An uploaded or produced file (OpenAI's file object); its bytes live in file_chunks."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    filename: Mapped[str] = mapped_column(String(1024))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = _now_column()
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Past it the file answers 404; api.retention then deletes its bytes.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "ix_files_expires_at",
            "expires_at",
            postgresql_where=text("expires_at IS NOT NULL AND deleted_at IS NULL"),
        ),
    )


class FileChunk(Base):
    """A piece of a file's bytes, in order: files stream in and out without being held whole."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """A batch of chat completion requests read from an uploaded JSONL file."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[BatchStatus] = mapped_column(
        Enum(BatchStatus, native_enum=False, length=16, validate_strings=True),
        default=BatchStatus.validating,
    )
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    # OpenAI's `errors` list: why the batch failed as a whole.
    errors: Mapped[dict[str, Any] | None] = mapped_column(Json)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", Json)
    model: Mapped[str | None] = mapped_column(String(200))
    # Lines read, and lines that failed validation (they are never jobs).
    total: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    # Its jobs that have ended, counted in the transaction that ends them (workers/jobs.py,
    # core/handback.py), so that showing a batch reads none of its jobs: those that succeeded
    # ("completed"), those that failed (invalid lines apart), and the succeeded ones' usage.
    # Cancelled and expired jobs are in neither count.
    completed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Tokens its valid lines are estimated to use, by model, reserved against the project's
    # batch queue limit while it is in progress and released in proportion as its jobs end.
    queued_tokens: Mapped[dict[str, int] | None] = mapped_column(Json)
    # Seconds after they are written that its output and error files expire (OpenAI's
    # `output_expires_after`, or the project's setting when the batch was created).
    output_expires_after: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _now_column()
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_batches_project_created_at", "project", "created_at", "id"),)


class BatchLineError(Base):
    """A line of a batch's input that failed validation: it goes to the error file."""

    __tablename__ = "batch_line_errors"

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(512))
    error: Mapped[dict[str, Any]] = mapped_column(Json)


class Job(Base):
    """One chat completion request and, once done, its response or error."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, validate_strings=True),
        default=JobStatus.queued,
    )
    request: Mapped[dict[str, Any] | None] = mapped_column(Json)
    response: Mapped[dict[str, Any] | None] = mapped_column(Json)
    # OpenAI's error envelope, and the HTTP status it answers with.
    error: Mapped[dict[str, Any] | None] = mapped_column(Json)
    error_status: Mapped[int | None] = mapped_column(Integer)
    store: Mapped[bool] = mapped_column(Boolean, default=False)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", Json)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    # Of the prompt tokens, those the engine's prefix cache held. The usage columns are written
    # with the result and outlive the content: usage is summed from them (api/usage.py).
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    # For a batch's jobs: the batch, the line's custom_id and its line number in the input.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    line_number: Mapped[int | None] = mapped_column(Integer)
    # A client's Idempotency-Key and the hash of the body it came with (scoped to the API key).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now_column()
    # When the job last entered its queue (at creation, or when the reconciler sent it again).
    queued_at: Mapped[datetime] = _now_column()
    # When its message was last handed to the broker (or, if sooner, claimed from it); None while
    # it is not (yet) in the broker. The reconciler sends queued jobs without one.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the result reached its client; a `store: false` job's content is purged from then on.
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A stored completion deleted through the API: its content is purged, its accounting stays.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Unix seconds of `created_at`, as the completion's `created` field.
    created: Mapped[int] = mapped_column(BigInteger)
    # An asynchronous completion (`Prefer: respond-async`): when it ends, a trigger writes its
    # webhook event (migration 0014), sent to its project's endpoints and to `callback_url`.
    notify: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    callback_url: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_jobs_model_status", "model", "status"),
        # The reconciler: queued jobs whose message may be lost, running jobs of dead workers.
        Index(
            "ix_jobs_undispatched",
            "queued_at",
            postgresql_where=text("status = 'queued' AND dispatched_at IS NULL"),
        ),
        Index(
            "ix_jobs_queued_dispatched",
            "model",
            "dispatched_at",
            postgresql_where=text("status = 'queued'"),
        ),
        Index("ix_jobs_running_worker", "worker", postgresql_where=text("status = 'running'")),
        Index("ix_jobs_project_created_at", "project", "created_at"),
        # Throughput over the last minutes (the dashboard), read from the index alone.
        Index(
            "ix_jobs_finished_at",
            "finished_at",
            postgresql_include=["completion_tokens"],
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        # The Usage API: a project's succeeded jobs by when they ended, with what it sums and
        # groups by, read from the index alone.
        Index(
            "ix_jobs_usage_project_finished_at",
            "project",
            "finished_at",
            postgresql_include=[
                "model",
                "api_key_id",
                "batch_id",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
            ],
            postgresql_where=text("status = 'succeeded'"),
        ),
        Index(
            "ix_jobs_batch_line",
            "batch_id",
            "line_number",
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
        Index(
            "ix_jobs_batch_status",
            "batch_id",
            "status",
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
        # The stored-completions list: by project, optionally by model, in creation order.
        Index(
            "ix_jobs_stored_project_created",
            "project",
            "created_at",
            "id",
            postgresql_where=text("store AND deleted_at IS NULL AND status = 'succeeded'"),
        ),
        Index(
            "ix_jobs_stored_project_model_created",
            "project",
            "model",
            "created_at",
            "id",
            postgresql_where=text("store AND deleted_at IS NULL AND status = 'succeeded'"),
        ),
        # Metadata filters (`metadata @> {...}`).
        Index(
            "ix_jobs_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
            postgresql_where=text("store AND deleted_at IS NULL"),
        ),
        Index(
            "uq_jobs_api_key_idempotency_key",
            "api_key_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class DeliveryStatus(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookEndpoint(Base):
    """A URL a project's events are sent to, signed with its secret (sealed, core.webhooks)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    project: Mapped[str] = mapped_column(
        ForeignKey("projects.name", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(Text)
    # The event types it is sent; None: every type.
    events: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    secret_sealed: Mapped[str] = mapped_column(Text)
    # During a rotation, the secret before, which also signs until `previous_secret_until`.
    previous_secret_sealed: Mapped[str | None] = mapped_column(Text)
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()
    # The circuit breaker: failed attempts in a row; while the circuit is open nothing is sent,
    # then one delivery probes it.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    circuit_open_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_failure_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookEvent(Base):
    """An event as it is sent: OpenAI's envelope, written by a trigger (migration 0014) in the
    transaction of the change it reports."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    project: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    payload: Mapped[dict[str, Any]] = mapped_column(Json)

    __table_args__ = (Index("ix_webhook_events_created_at", "created_at"),)


class WebhookDelivery(Base):
    """The outbox: an event to send to one endpoint, or to a completion's own callback URL."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    callback_url: Mapped[str | None] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(DeliveryStatus, native_enum=False, length=16, validate_strings=True),
        default=DeliveryStatus.pending,
        server_default="pending",
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = _now_column()
    # A sender holds the delivery until then; past it, another may take it.
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()

    __table_args__ = (
        Index(
            "ix_webhook_deliveries_pending",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )


class WebhookAttempt(Base):
    """One try at a delivery: what the receiver answered (at most 1 KiB of it), or why not."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)
