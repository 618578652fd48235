"""The database engine, and the schema's migrations (Alembic) run and checked from code."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaOutdated(Exception):
    """The database's schema is not the one this version of Ephemera needs."""


def make_engine(url: str) -> AsyncEngine:
    # pre_ping: a connection left over from before an outage is tested before use, not failed on.
    return (
        create_async_engine(url, pool_pre_ping=True, pool_size=5)
        if url.startswith("postgresql")
        else (create_async_engine(url, pool_pre_ping=True))
    )


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to `revision` (what `ephemera db upgrade` runs)."""
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def check_schema(engine: AsyncEngine, seconds: float = 10.0) -> None:
    """Raise SchemaOutdated unless the database is at the head revision."""
    current = await asyncio.wait_for(current_revision(engine), seconds)
    head = head_revision()
    if current != head:
        raise SchemaOutdated(
            f"the records database is at schema revision {current or 'none (empty)'}, this operator needs {head}: "
            "run `ephemera db upgrade` (with the same EPHEMERA_DATABASE_URL), then start the operator again"
        )
