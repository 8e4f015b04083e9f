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
    Index,
    Integer,
    MetaData,
    String,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres; plain JSON elsewhere keeps the models importable without it.
Json = JSON().with_variant(JSONB(), "postgresql")


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
    created_at: Mapped[datetime] = _now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ServedModel(Base):
    """A model some worker has served: requests for it are accepted and queued."""

    __tablename__ = "served_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Optional request features the serving workers' model supports (see core.capabilities).
    capabilities: Mapped[list[str]] = mapped_column(Json, default=list, server_default="[]")
    # Changes when the model's files or the engine change (the response's system_fingerprint).
    system_fingerprint: Mapped[str | None] = mapped_column(String(64))
    first_served_at: Mapped[datetime] = _now_column()
    last_served_at: Mapped[datetime] = _now_column()


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
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    # A client's Idempotency-Key and the hash of the body it came with (scoped to the API key).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the result reached its client; a `store: false` job's content is purged from then on.
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A stored completion deleted through the API: its content is purged, its accounting stays.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Unix seconds of `created_at`, as the completion's `created` field.
    created: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_jobs_model_status", "model", "status"),
        Index("ix_jobs_project_created_at", "project", "created_at"),
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
