"""What we change on an instrumented pool, and how it is undone.

Three methods are set on the pool *instance*, never on its class: `connect` (checkout:
waiting callers, wait time and timeouts, which no event sees, and the hold's opening),
`_return_conn` (every checkin passes through it: the hold's end) and `recreate` (so the
pool that `engine.dispose()` builds is patched too). `Engine.raw_connection()` calls
`self.pool.connect()`, `_ConnectionRecord.checkin()` calls `pool._return_conn(record)` and
`Engine.dispose()` calls `self.pool.recreate()`: instance attributes win over the class.

Why not a subclass swapped into `pool.__class__`: the application would see it. `type(pool)`
is no longer the class it chose, two engines' pools no longer share a class, and since
SQLAlchemy names a pool's logger after its class, SQLAlchemy's own pool log records
(errors with tracebacks included) would come out under our module's name, unseen by
logging configured for `sqlalchemy.pool`.

Each attribute store is atomic, so patching and unpatching are safe under traffic: a
thread already inside a wrapper finishes it, the next call sees the new attribute.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from monitor.protocols import Patching

#: Marks our wrappers, so that a pool is never patched twice nor unpatched by mistake.
MARK = "__pool_monitor__"
PATCHED = ("connect", "_return_conn", "recreate")


def _base(pool: Any, name: str) -> Callable[..., Any]:
    """What the wrapper calls with the pool as first argument: the class's function, or
    an instance attribute someone set before us (called without the pool). Where the
    class's method is SQLAlchemy's own one-line delegation (`Pool.connect` is
    `_ConnectionFairy._checkout(self)`, `Pool._return_conn` is
    `self._do_return_conn(record)`), the wrapper calls the delegate itself: one Python
    frame fewer on every checkout and every return, with the same effect."""
    own = pool.__dict__.get(name)
    if own is not None:
        return lambda _pool, *args: own(*args)
    function = getattr(type(pool), name)
    delegate = _DELEGATES.get((name, function))
    if delegate is not None and delegate[0] not in pool.__dict__:
        return getattr(type(pool), delegate[0]) if delegate[0] else delegate[1]
    return function


def _one_line_delegations() -> dict[tuple[str, Any], tuple[str, Any]]:
    """SQLAlchemy's base `Pool` methods that only delegate, checked by the names their
    code uses (a SQLAlchemy that adds anything to them is simply not short-cut)."""
    from sqlalchemy.pool import Pool
    from sqlalchemy.pool.base import _ConnectionFairy

    found: dict[tuple[str, Any], tuple[str, Any]] = {}
    if Pool.connect.__code__.co_names == ("_ConnectionFairy", "_checkout"):
        found[("connect", Pool.connect)] = ("", _ConnectionFairy._checkout)
    if Pool._return_conn.__code__.co_names == ("_do_return_conn",):
        found[("_return_conn", Pool._return_conn)] = ("_do_return_conn", None)
    return found


_DELEGATES = _one_line_delegations()


def patch(pool: Any, monitor: Patching) -> None:
    """Set our `connect`, `_return_conn` and `recreate` on `pool` (idempotent)."""
    if is_patched(pool):
        return
    hooks = monitor.hooks
    wrappers: dict[str, Any] = {
        "connect": hooks["wrap_connect"](pool, _base(pool, "connect")),
        "_return_conn": hooks["wrap_return"](pool, _base(pool, "_return_conn")),
        "recreate": _wrap_recreate(pool, _base(pool, "recreate"), monitor),
    }
    saved = {name: pool.__dict__[name] for name in PATCHED if name in pool.__dict__}
    for wrapper in wrappers.values():
        setattr(wrapper, MARK, saved)
    # `_return_conn` first: a return must find its hold's end before checkouts open holds.
    for name in ("_return_conn", "recreate", "connect"):
        setattr(pool, name, wrappers[name])


def unpatch(pool: Any) -> None:
    """Restore `pool` exactly: our attributes removed, any earlier instance attribute
    put back. `connect` goes first, so no hold opens whose return we would miss."""
    for name in ("connect", "recreate", "_return_conn"):
        wrapper = pool.__dict__.get(name)
        saved = getattr(wrapper, MARK, None)
        if saved is None:
            continue
        if name in saved:
            setattr(pool, name, saved[name])
        else:
            delattr(pool, name)


def is_patched(pool: Any) -> bool:
    return getattr(pool.__dict__.get("connect"), MARK, None) is not None


def returns_to_a_monitor(pool: Any) -> bool:
    """Whether `pool`'s returns reach some monitor (for records it lends to other pools)."""
    return getattr(pool.__dict__.get("_return_conn"), MARK, None) is not None


def _wrap_recreate(
    pool: Any, base_recreate: Callable[[Any], Any], monitor: Patching
) -> Callable[[], Any]:
    pool_ref = weakref.ref(pool)

    def recreate() -> Any:
        new_pool = base_recreate(pool_ref())
        monitor.recreated(new_pool)
        return new_pool

    return recreate
