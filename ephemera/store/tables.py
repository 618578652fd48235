"""The two tables: `environment` (one row per PreviewEnvironment ever) and `environment_event`."""

from __future__ import annotations

import datetime

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, String
from sqlmodel import Field, SQLModel


def _utc(**kwargs: object) -> Column[datetime.datetime]:
    return Column(DateTime(timezone=True), **kwargs)  # type: ignore[arg-type]


class EnvironmentRow(SQLModel, table=True):
    """One PreviewEnvironment, keyed by its uid, kept after it is destroyed until the retention passes."""

    __tablename__ = "environment"

    uid: str = Field(primary_key=True, max_length=64)
    name: str = Field(index=True, max_length=253)
    repository: str = Field(index=True, max_length=140)
    pull_request: int = Field(sa_column=Column(BigInteger, nullable=False))  # int64, as the CRD allows
    commit_sha: str = Field(max_length=40)
    namespace: str | None = Field(default=None, max_length=63)
    phase: str = Field(index=True, max_length=32)
    message: str | None = None
    installation_id: int | None = None
    created_at: datetime.datetime | None = Field(default=None, sa_column=_utc())
    ready_at: datetime.datetime | None = Field(default=None, sa_column=_utc())
    destroyed_at: datetime.datetime | None = Field(default=None, sa_column=_utc(index=True))
    updated_at: datetime.datetime = Field(sa_column=_utc(nullable=False))


class EventRow(SQLModel, table=True):
    """One phase transition. The id is derived from the transition, so writing it twice is a no-op."""

    __tablename__ = "environment_event"

    id: str = Field(primary_key=True, max_length=36)
    environment_uid: str = Field(
        sa_column=Column(String(64), ForeignKey("environment.uid", ondelete="CASCADE"), index=True, nullable=False)
    )
    at: datetime.datetime = Field(sa_column=_utc(nullable=False, index=True))
    from_phase: str | None = Field(default=None, max_length=32)
    to_phase: str = Field(max_length=32)
    reason: str = Field(max_length=128)
    message: str | None = None
