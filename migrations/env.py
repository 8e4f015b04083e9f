"""Alembic environment: Ferry's tables, the URL from the config or FERRY_DATABASE_URL."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from core.settings import CoreSettings
from core.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or CoreSettings().database_url
target_metadata = Base.metadata


def run_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connectable = engine_from_config(
        {"sqlalchemy.url": url},
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        hide_parameters=True,  # as core.db's engines: no client data in error text
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
