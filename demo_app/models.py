"""ORM models of the demo, one group per seed document; every table is prefixed `demo_`.

The prefix keeps the demo's tables apart from anything else in a database given through
`DATABASE_URL`, so the runner can drop and recreate exactly its own tables.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def _created() -> Mapped[datetime]:
    # clock_timestamp(), not now(): rows inserted by retries in quick succession must get
    # distinct, ordered timestamps for `order_by(created_at.desc())` to mean "latest".
    return mapped_column(DateTime(timezone=True), server_default=func.clock_timestamp())


# --- seed 002, scenario 1: image processing (external_call) ---------------------------


class Image(Base):
    """An image processed by the fake external service."""

    __tablename__ = "demo_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(50), index=True)
    original_url: Mapped[str] = mapped_column(Text)
    processed_url: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    file_size: Mapped[int | None] = mapped_column(Integer)
    processing_time: Mapped[float | None]
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


# --- seed 002: background work on the API's pool (pool_isolation) ---------------------


class Video(Base):
    """A background render job (the seed's `video_task.py`), slow and external."""

    __tablename__ = "demo_videos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(50), index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    video_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


# --- seed 002: duplicate task ids (duplicate_rows) ------------------------------------


class Project(Base):
    """The seed's `Project`: `task_id` is indexed but not unique, so retries duplicate it."""

    __tablename__ = "demo_projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(50), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = _created()


# --- seed 002, scenario 2: payments (idempotent_payment) ------------------------------


class Order(Base):
    __tablename__ = "demo_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_number: Mapped[str] = mapped_column(String(50), unique=True, index=True)
    customer_id: Mapped[str] = mapped_column(String(50), index=True)
    total_amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    created_at: Mapped[datetime] = _created()


class Payment(Base):
    """One payment attempt; a row with a gateway transaction id is one real charge."""

    __tablename__ = "demo_payments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payment_id: Mapped[str] = mapped_column(String(80), unique=True, index=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("demo_orders.id"), index=True)
    # Recorded for both variants (so the report can count charges per key); only the
    # idempotent variant *enforces* it, through `IdempotencyKey`.
    idempotency_key: Mapped[str] = mapped_column(String(80), index=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    currency: Mapped[str] = mapped_column(String(3), default="KRW")
    status: Mapped[str] = mapped_column(String(20), default="pending")
    gateway_transaction_id: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class IdempotencyKey(Base):
    """The unique constraint that makes `INSERT … ON CONFLICT DO NOTHING` pick one owner."""

    __tablename__ = "demo_idempotency_keys"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = _created()


# --- seed 003: lost updates (lost_update) ----------------------------------------------


class Post(Base):
    """The seed's `posts` row whose `like` two threads increment."""

    __tablename__ = "demo_posts"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    like: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    version: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    modified_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class VersionedPost(Base):
    """The same table mapped with `version_id_col`, as the seed's optimistic-lock step does.

    A separate mapping (rather than versioning `Post` itself) keeps the naive and
    pessimistic variants exactly as the seed wrote them.
    """

    __table__ = Post.__table__
    __mapper_args__ = {"version_id_col": Post.__table__.c.version}  # noqa: RUF012

    pk: Mapped[int]
    like: Mapped[int]
    version: Mapped[int]


# --- seed 000: worker run with a heartbeat lease (shared_session) ---------------------


class Run(Base):
    """A job run whose lease a heartbeat thread keeps extending, guarded by `version`."""

    __tablename__ = "demo_runs"

    run_id: Mapped[str] = mapped_column(String(50), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, default=0)
    heartbeats: Mapped[int] = mapped_column(Integer, default=0)
