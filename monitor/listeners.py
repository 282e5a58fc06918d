"""Adding and removing our event listeners while the application is running.

SQLAlchemy fires an event by iterating the collection's `listeners` deque. `event.listen`
and `event.remove` mutate that same deque in place, so calling them while another thread
checks a connection in makes *that* thread raise `RuntimeError: deque mutated during
iteration` from inside the application's `Connection.close()`, and the aborted return
leaks the pool slot. We never mutate a deque that may be iterated: we build a new one and
swap it in with a single attribute store, which a firing thread never observes half-done
(it keeps iterating the deque it already holds).

Our listeners are not entered in SQLAlchemy's event registry, so `event.contains()` does
not report them and `event.remove()` cannot reach them; only this module adds or removes
them. `Pool.recreate()` copies them onto the new pool like any other listener.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


def _collection(target: Any, name: str) -> Any:
    """The instance-level listener collection for `name` on `target` (created if absent,
    the way `event.listen` does: by swapping the dispatch attribute, itself atomic)."""
    dispatch = target.dispatch
    return getattr(dispatch, name).for_modify(dispatch)


def add(target: Any, name: str, fn: Callable[..., Any]) -> None:
    """Append `fn` to `target`'s `name` listeners (once)."""
    collection = _collection(target, name)
    current = collection.listeners
    if fn not in current:
        collection.listeners = deque((*current, fn))


def remove(target: Any, name: str, fn: Callable[..., Any]) -> None:
    """Remove `fn` from `target`'s `name` listeners, if there."""
    collection = getattr(target.dispatch, name)
    current = getattr(collection, "listeners", ())
    if fn in current:
        collection.listeners = deque(f for f in current if f is not fn)


def contains(target: Any, name: str, fn: Callable[..., Any]) -> bool:
    return fn in getattr(getattr(target.dispatch, name), "listeners", ())
