"""Seed 003: two threads × 25 increments of one row's `like`, each thread with its own Session.

* `naive`       – read, add one, commit (the seed's `increase_like`): both threads read the
  same value and both write value + 1, so increments are lost (the seed ended at 27).
* `pessimistic` – `with_for_update()`: the read locks the row until commit, so the other
  thread waits and then reads the new value. Always exactly 50.
* `optimistic`  – `version_id_col` (the seed's §3): the UPDATE carries
  `WHERE version = <read version>`; if the other thread got there first no row matches,
  SQLAlchemy raises `StaleDataError`, and we re-read and retry (bounded). Always 50.

A small `think_s` pause between the read and the write stands for the seed's logging and
any real work in that window; it makes the race show up on every run instead of most runs.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from demo_app.models import Post, VersionedPost

SessionFactory = Callable[[], Session]


@dataclass
class Tally:
    """What one thread saw: increments committed, retries, the longest blocking statement."""

    increments: int = 0
    retries: int = 0
    lock_wait_max_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def timed(self, statement: Callable[[], object]) -> object:
        """Run the statement that can block on the other thread's row lock, and time it."""
        start = time.perf_counter()
        try:
            return statement()
        finally:
            self.lock_wait_max_s = max(self.lock_wait_max_s, time.perf_counter() - start)


@dataclass(frozen=True)
class LostUpdateResult:
    variant: str
    expected: int
    actual: int
    retries: int
    lock_wait_max_s: float
    duration_s: float
    errors: list[str]

    @property
    def lost(self) -> int:
        return self.expected - self.actual


def create_post(factory: SessionFactory) -> int:
    """A fresh row with like = 0 (the seed's `create_default_post`), one per run."""
    with factory() as session:
        post = Post()
        session.add(post)
        session.commit()
        return post.pk


def read_likes(factory: SessionFactory, post_id: int) -> int:
    """Ground truth: the committed value in the database."""
    with factory() as session:
        return session.execute(select(Post.like).where(Post.pk == post_id)).scalar_one()


def naive_increase_like(
    factory: SessionFactory, post_id: int, increments: int, think_s: float, tally: Tally
) -> None:
    """❌ Read-modify-write without a lock (the seed's `increase_like`)."""
    with factory() as session:
        for _ in range(increments):
            post = session.query(Post).filter(Post.pk == post_id).first()
            if post is None:
                raise LookupError(post_id)
            time.sleep(think_s)
            post.like += 1
            tally.timed(session.commit)
            tally.increments += 1


def pessimistic_increase_like(
    factory: SessionFactory, post_id: int, increments: int, think_s: float, tally: Tally
) -> None:
    """✅ `SELECT … FOR UPDATE`: the row stays locked from read to commit."""
    with factory() as session:
        # A named function, not a lambda: the checkout's code site is this function's
        # line, and the dashboards tell variants apart by `pessimistic_*` sites.
        def pessimistic_read_for_update() -> Post | None:
            return session.query(Post).filter(Post.pk == post_id).with_for_update().first()

        for _ in range(increments):
            post = tally.timed(pessimistic_read_for_update)
            if not isinstance(post, Post):
                raise LookupError(post_id)
            time.sleep(think_s)
            post.like += 1
            session.commit()
            tally.increments += 1


def optimistic_increase_like(
    factory: SessionFactory,
    post_id: int,
    increments: int,
    think_s: float,
    tally: Tally,
    max_retries: int = 100,
) -> None:
    """✅ `version_id_col`: a stale write fails with `StaleDataError`; re-read and retry.

    Each failure means another writer committed in between, so with W writers of N
    increments a thread retries at most (W-1)·N times in all: `max_retries` only guards
    against a bug, never cuts a legitimate run short.
    """
    with factory() as session:
        for _ in range(increments):
            for _attempt in range(max_retries + 1):
                post = session.get(VersionedPost, post_id)
                if post is None:
                    raise LookupError(post_id)
                time.sleep(think_s)
                post.like += 1
                try:
                    tally.timed(session.commit)  # UPDATE … WHERE pk = :pk AND version = :v
                except StaleDataError:
                    session.rollback()
                    tally.retries += 1
                    continue
                tally.increments += 1
                break
            else:
                raise RuntimeError(f"gave up after {max_retries} retries")


VARIANTS: dict[str, Callable[..., None]] = {
    "naive": naive_increase_like,
    "pessimistic": pessimistic_increase_like,
    "optimistic": optimistic_increase_like,
}


def run_concurrent_increments(
    factory: SessionFactory,
    variant: str,
    *,
    threads: int = 2,
    increments: int = 25,
    think_s: float = 0.002,
    timeout_s: float = 60.0,
) -> LostUpdateResult:
    """The seed's `/2th` endpoints: start the threads together, join them, read the row."""
    worker = VARIANTS[variant]
    post_id = create_post(factory)
    tallies = [Tally() for _ in range(threads)]
    start_together = threading.Barrier(threads)

    def body(tally: Tally) -> None:
        try:
            start_together.wait(timeout=10)
            worker(factory, post_id, increments, think_s, tally)
        except Exception as exc:  # reported, never swallowed silently
            tally.errors.append(f"{type(exc).__name__}: {exc}")

    # Each thread runs in a copy of the caller's context, so its checkouts belong to the
    # request's trace (a bare Thread starts with an empty context: no span).
    pool = [
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(body, t),
            name=f"{variant}-increment-{i}",
            daemon=True,
        )
        for i, t in enumerate(tallies)
    ]
    started = time.perf_counter()
    for t in pool:
        t.start()
    deadline = started + timeout_s
    for t in pool:
        t.join(max(0.0, deadline - time.perf_counter()))
    duration = time.perf_counter() - started
    errors = [e for t in tallies for e in t.errors]
    errors += [f"thread {t.name} still running after {timeout_s}s" for t in pool if t.is_alive()]
    return LostUpdateResult(
        variant=variant,
        expected=threads * increments,
        actual=read_likes(factory, post_id),
        retries=sum(t.retries for t in tallies),
        lock_wait_max_s=max(t.lock_wait_max_s for t in tallies),
        duration_s=duration,
        errors=errors,
    )
