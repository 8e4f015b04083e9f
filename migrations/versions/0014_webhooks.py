"""webhooks: projects' endpoints, the events they are sent, the outbox of deliveries and every
attempt; triggers that write an event and its deliveries in the transaction that ends a batch or
an asynchronous completion"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision, down_revision = "0014", "0013"
branch_labels = depends_on = None

# One event and one delivery per subscribed endpoint (and the completion's own callback URL, if
# it named one), then a notification that wakes the senders once the transaction commits. An
# event nobody is subscribed to is not written.
EVENT_FUNCTION = """
CREATE FUNCTION ferry_webhook_event(p_project text, p_type text, p_object_id text,
                                    p_callback text) RETURNS void AS $$
DECLARE
    event_id text := 'evt_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    IF p_callback IS NULL AND NOT EXISTS (
        SELECT 1 FROM webhook_endpoints e
        WHERE e.project = p_project AND (e.events IS NULL OR p_type = ANY (e.events))
    ) THEN
        RETURN;
    END IF;
    INSERT INTO webhook_events (id, project, type, created_at, payload)
    VALUES (event_id, p_project, p_type, now(), jsonb_build_object(
        'id', event_id,
        'object', 'event',
        'created_at', floor(extract(epoch FROM now()))::bigint,
        'type', p_type,
        'data', jsonb_build_object('id', p_object_id)));
    INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT event_id, e.id FROM webhook_endpoints e
    WHERE e.project = p_project AND (e.events IS NULL OR p_type = ANY (e.events));
    IF p_callback IS NOT NULL THEN
        INSERT INTO webhook_deliveries (event_id, callback_url) VALUES (event_id, p_callback);
    END IF;
    PERFORM pg_notify('ferry_webhooks', event_id);
END
$$ LANGUAGE plpgsql
"""

# Whatever writes the status (the API, a worker, the reconciler, a batch's finalizer), the
# event is written with it or not at all.
BATCH_FUNCTION = """
CREATE FUNCTION ferry_batch_webhook() RETURNS trigger AS $$
BEGIN
    IF NEW.status IN ('completed', 'failed', 'expired', 'cancelled')
       AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status) THEN
        PERFORM ferry_webhook_event(NEW.project, 'batch.' || NEW.status, NEW.id, NULL);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""

JOB_FUNCTION = """
CREATE FUNCTION ferry_job_webhook() RETURNS trigger AS $$
BEGIN
    PERFORM ferry_webhook_event(
        NEW.project,
        CASE WHEN NEW.status = 'succeeded' THEN 'chat.completion.completed'
             ELSE 'chat.completion.failed' END,
        NEW.id,
        NEW.callback_url);
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("notify", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("jobs", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("projects", sa.Column("callback_secret_sealed", sa.Text(), nullable=True))
    op.add_column(
        "projects", sa.Column("callback_previous_secret_sealed", sa.Text(), nullable=True)
    )
    op.add_column(
        "projects",
        sa.Column("callback_previous_secret_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("project", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("secret_sealed", sa.Text(), nullable=False),
        sa.Column("previous_secret_sealed", sa.Text(), nullable=True),
        sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("circuit_open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["project"],
            ["projects.name"],
            name="fk_webhook_endpoints_project_projects",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_endpoints"),
    )
    op.create_index("ix_webhook_endpoints_project", "webhook_endpoints", ["project"])
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("project", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_events"),
    )
    op.create_index("ix_webhook_events_created_at", "webhook_events", ["created_at"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("endpoint_id", sa.Text(), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhook_events.id"],
            name="fk_webhook_deliveries_event_id_webhook_events",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name="fk_webhook_deliveries_endpoint_id_webhook_endpoints",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
    )
    op.create_index(
        "ix_webhook_deliveries_pending",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_webhook_deliveries_event_id", "webhook_deliveries", ["event_id"])
    op.create_index("ix_webhook_deliveries_endpoint_id", "webhook_deliveries", ["endpoint_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name="fk_webhook_attempts_delivery_id_webhook_deliveries",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_attempts"),
    )
    op.create_index("ix_webhook_attempts_delivery_id", "webhook_attempts", ["delivery_id"])
    op.execute(EVENT_FUNCTION)
    op.execute(BATCH_FUNCTION)
    op.execute(JOB_FUNCTION)
    op.execute(
        "CREATE TRIGGER batches_webhook AFTER INSERT OR UPDATE OF status ON batches "
        "FOR EACH ROW EXECUTE FUNCTION ferry_batch_webhook()"
    )
    op.execute(
        "CREATE TRIGGER jobs_webhook AFTER UPDATE OF status ON jobs FOR EACH ROW "
        "WHEN (NEW.notify AND OLD.status IN ('queued', 'running') "
        "AND NEW.status IN ('succeeded', 'failed', 'cancelled')) "
        "EXECUTE FUNCTION ferry_job_webhook()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_webhook ON jobs")
    op.execute("DROP TRIGGER batches_webhook ON batches")
    op.execute("DROP FUNCTION ferry_job_webhook()")
    op.execute("DROP FUNCTION ferry_batch_webhook()")
    op.execute("DROP FUNCTION ferry_webhook_event(text, text, text, text)")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_events")
    op.drop_table("webhook_endpoints")
    for name in (
        "callback_previous_secret_until",
        "callback_previous_secret_sealed",
        "callback_secret_sealed",
    ):
        op.drop_column("projects", name)
    op.drop_column("jobs", "callback_url")
    op.drop_column("jobs", "notify")
