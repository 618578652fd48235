"""Read-side queries behind `ephemera environments list` and `history`."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlmodel import col, select

from ephemera.store.tables import EnvironmentRow, EventRow


async def list_environments(
    engine: AsyncEngine, *, phase: str | None = None, repository: str | None = None, limit: int = 1000
) -> list[EnvironmentRow]:
    query = select(EnvironmentRow).order_by(col(EnvironmentRow.updated_at).desc()).limit(limit)
    if phase:
        query = query.where(col(EnvironmentRow.phase) == phase)
    if repository:
        query = query.where(col(EnvironmentRow.repository) == repository)
    async with AsyncSession(engine) as session:
        return list((await session.execute(query)).scalars())


async def history(engine: AsyncEngine, name: str) -> list[tuple[EnvironmentRow, list[EventRow]]]:
    """Every environment ever called `name` (a name is reused when a PR reopens), with its events in order."""
    async with AsyncSession(engine) as session:
        rows = list(
            (
                await session.execute(
                    select(EnvironmentRow)
                    .where(col(EnvironmentRow.name) == name)
                    .order_by(col(EnvironmentRow.created_at))
                )
            ).scalars()
        )
        result = []
        for row in rows:
            events = (
                await session.execute(
                    select(EventRow)
                    .where(col(EventRow.environment_uid) == row.uid)
                    .order_by(col(EventRow.at), col(EventRow.id))
                )
            ).scalars()
            result.append((row, list(events)))
        return result
