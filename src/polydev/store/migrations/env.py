"""Alembic environment. Polydev runs migrations itself (store.db.migrate) and hands Alembic an open
connection; there is no alembic.ini to keep in sync with the settings."""

from alembic import context

from polydev.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `polydev db` and migrate() call Alembic
    raise RuntimeError("run migrations through `polydev db upgrade`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
