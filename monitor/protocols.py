"""What the hot path and the pool patches need of a monitor, as types.

`monitor.hooks` and `monitor.poolpatch` are built *by* `monitor.pool_monitor.PoolMonitor`;
naming that class in their signatures would make them import the module that imports
them. They name these protocols instead, which `PoolMonitor` satisfies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from monitor.config import Settings
from monitor.ledger import Hold, Ledger
from monitor.sites import SiteFinder


class Monitored(Protocol):
    """A monitor as its hooks see it (`monitor.hooks.build_hooks`)."""

    name: str
    serial: int
    settings: Settings
    ledger: Ledger
    sites: SiteFinder

    def report_return(self, hold: Hold, held: float) -> None: ...


class Patching(Protocol):
    """A monitor as the pool patches see it (`monitor.poolpatch.patch`)."""

    hooks: dict[str, Callable[..., Any]]

    def recreated(self, pool: Any) -> None: ...
