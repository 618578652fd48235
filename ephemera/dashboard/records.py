"""What the dashboard reads from the records database (read-only): besides an environment's history
(ephemera.store.queries.history), the day's figures of the totals page."""

from __future__ import annotations

import datetime

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlmodel import col, select

from ephemera.api.models import Phase
from ephemera.store.tables import EnvironmentRow, EventRow


def _aware(value: datetime.datetime) -> datetime.datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


async def ready_samples(engine: AsyncEngine, since: datetime.datetime) -> list[tuple[datetime.datetime, float]]:
    """(when, seconds) from creation to the first Ready, of every environment first Ready since `since`."""
    query = select(EnvironmentRow.created_at, EnvironmentRow.ready_at).where(
        col(EnvironmentRow.ready_at) >= since, col(EnvironmentRow.created_at).is_not(None)
    )
    async with AsyncSession(engine) as session:
        found = (await session.execute(query)).all()
    samples = []
    for created, ready in found:
        if created is not None and ready is not None:
            ready = _aware(ready)
            samples.append((ready, max(0.0, (ready - _aware(created)).total_seconds())))
    return samples


async def failures_by_reason(engine: AsyncEngine, since: datetime.datetime) -> list[tuple[str, int]]:
    """Transitions into Failed since `since`, counted by reason, most frequent first."""
    count = func.count(col(EventRow.id))
    query = (
        select(EventRow.reason, count)
        .where(col(EventRow.to_phase) == Phase.FAILED.value, col(EventRow.at) >= since)
        .group_by(col(EventRow.reason))
        .order_by(count.desc(), col(EventRow.reason))
    )
    async with AsyncSession(engine) as session:
        return [(str(reason), int(n)) for reason, n in (await session.execute(query)).all()]
