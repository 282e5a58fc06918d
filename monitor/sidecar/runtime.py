"""The running sidecar: a scanning thread, a PostgreSQL polling thread, and their results.

Both loops run off the event loop, on their own schedules, and publish immutable results
(`View`, `PgView`) by reference swap; request handlers only read those. So a slow disk or
a slow database never delays a scrape, and a scrape never triggers work. (`/api/checkouts`
may ask the polling thread for an early, rate-limited poll: `PostgresCollector.refresh`.)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from monitor.sidecar.aggregate import EMPTY, Aggregator, View
from monitor.sidecar.auth import Access
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.metrics import Registries
from monitor.sidecar.postgres import PostgresCollector

log = logging.getLogger("monitor.sidecar")


class Sidecar:
    """Owns the aggregator, the PostgreSQL collector and the metric registries."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.aggregator = (
            Aggregator(config.snapshot_dir, config.max_snapshot_bytes, config.retain_dead_s)
            if config.snapshot_dir
            else None
        )
        self.view: View = EMPTY
        self.pg = PostgresCollector(
            config.postgres_dsn,
            config.postgres_interval,
            show_query_text=config.show_query_text,
            query_text_limit=config.query_text_limit,
        )
        self.registries = Registries(lambda: self.view, self.pg)
        self.access = Access(config.auth_token_file, config.listen_host, config.insecure_api)
        self.scanned = self.aggregator is None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scan_failing = False

    def scan(self) -> View:
        """Scan and merge once (the thread does this every `scan_interval`)."""
        if self.aggregator is None:
            return self.view
        try:
            self.view = self.aggregator.scan()
            self._scan_failing = False
        except Exception:  # keep serving the last view; say so once per streak
            if not self._scan_failing:
                log.exception(
                    "scanning %s failed; serving the previous view", self.config.snapshot_dir
                )
            self._scan_failing = True
        self.scanned = True
        return self.view

    def scan_live(self) -> View:
        """Re-read the live-hold documents only (the thread does this every
        `live_scan_interval` between full scans)."""
        if self.aggregator is None or not self.scanned:
            return self.scan()
        try:
            self.view = self.aggregator.scan_live()
        except Exception:  # same policy as a full scan
            if not self._scan_failing:
                log.exception(
                    "reading live documents in %s failed; serving the previous view",
                    self.config.snapshot_dir,
                )
            self._scan_failing = True
        return self.view

    def _run(self) -> None:
        """Full scans every `scan_interval`, live-document reads in between: the holds
        must be fresh (0.2 s), re-merging every counter that often would be waste."""
        live = min(self.config.live_scan_interval, self.config.scan_interval)
        next_full = time.monotonic() + self.config.scan_interval
        while not self._stop.wait(max(0.0, min(live, next_full - time.monotonic()))):
            if time.monotonic() >= next_full:
                next_full = time.monotonic() + self.config.scan_interval
                self.scan()
            else:
                self.scan_live()

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._run, name="pool-monitor-scan", daemon=True)
        self._thread.start()
        self.pg.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.pg.stop()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the snapshot directory has been read. PostgreSQL being down does not
        make the sidecar unready: it still serves, and says `pg_up 0`."""
        view = self.view
        ready = self.scanned and view.dir_error is None
        return ready, {
            "ready": ready,
            "snapshot_dir": self.config.snapshot_dir,
            "snapshot_dir_error": view.dir_error,
            "live_processes": sum(1 for p in view.processes if p["state"] == "live"),
            "postgres": {
                "configured": self.pg.view.configured,
                "up": self.pg.view.up,
                "error": self.pg.view.error,
            },
        }
