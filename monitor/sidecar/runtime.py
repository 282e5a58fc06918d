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

from monitor.sidecar.advice import AdviceWindow
from monitor.sidecar.aggregate import EMPTY, Aggregator, View
from monitor.sidecar.auth import Access
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.metrics import Registries
from monitor.sidecar.postgres import PostgresCollector
from monitor.sizing import Target

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
        self.advice = AdviceWindow(
            config.advice_window_s,
            Target(config.advice_target_p_wait, config.advice_target_wait_s),
        )
        self.registries = Registries(lambda: self.view, self.pg, self.scan_health, self.advice)
        self.access = Access(config.auth_token_file, config.listen_host, config.insecure_api)
        self.scanned = self.aggregator is None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scan_failing = False
        #: scans (full or live) that raised, and when one last succeeded (monotonic)
        self.scan_errors = 0
        self.last_scan_ok = time.monotonic()

    def scan(self) -> View:
        """Scan and merge once (the thread does this every `scan_interval`)."""
        if self.aggregator is None:
            return self.view
        try:
            self.view = self.aggregator.scan()
            self.advice.record(self.view, list(self.aggregator.procs.values()))
            self._scanned_ok()
        except Exception:  # keep serving the last view; say so once per streak
            self._scan_failed("scanning %s failed; serving the previous view")
        self.scanned = True
        return self.view

    def _scanned_ok(self) -> None:
        self._scan_failing = False
        self.last_scan_ok = time.monotonic()

    def _scan_failed(self, message: str) -> None:
        """Counted always, logged once per streak; the next scan runs on schedule."""
        self.scan_errors += 1
        if not self._scan_failing:
            log.exception(message, self.config.snapshot_dir)
        self._scan_failing = True

    def scan_age(self) -> float:
        """Seconds since a scan last succeeded: grows while scans fail or hang."""
        return max(0.0, time.monotonic() - self.last_scan_ok)

    def scan_stale_after(self) -> float:
        """A scan older than this means the scanning thread is stuck or keeps failing."""
        return max(10.0, 5 * self.config.scan_interval)

    def scan_health(self) -> tuple[int, float]:
        """(scan errors so far, seconds since the last successful scan), for `/metrics`."""
        return self.scan_errors, self.scan_age() if self.aggregator is not None else 0.0

    def scan_live(self) -> View:
        """Re-read the live-hold documents only (the thread does this every
        `live_scan_interval` between full scans)."""
        if self.aggregator is None or not self.scanned:
            return self.scan()
        try:
            self.view = self.aggregator.scan_live()
        except Exception:  # same policy as a full scan
            self._scan_failed("reading live documents in %s failed; serving the previous view")
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
        """Ready once the snapshot directory has been read, and while scans succeed: a scan
        thread that hangs (a file system that blocks) or keeps failing serves a frozen
        view, so it makes the sidecar unready after `scan_stale_after()` seconds.
        PostgreSQL being down does not: the sidecar still serves, and says `pg_up 0`."""
        view = self.view
        age = self.scan_age() if self.aggregator is not None else 0.0
        stuck = age > self.scan_stale_after()
        ready = self.scanned and view.dir_error is None and not stuck
        return ready, {
            "ready": ready,
            "snapshot_dir": self.config.snapshot_dir,
            "snapshot_dir_error": view.dir_error,
            "last_scan_age_s": round(age, 3),
            "scan_errors": self.scan_errors,
            "scan_stuck": stuck,
            "live_processes": sum(1 for p in view.processes if p["state"] == "live"),
            "postgres": {
                "configured": self.pg.view.configured,
                "up": self.pg.view.up,
                "error": self.pg.view.error,
            },
        }
