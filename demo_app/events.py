"""The monitor's log records, from the demo service's workers to the runner, as JSON lines.

pool-monitor reports a connection held past its threshold (logger `monitor.long_held`) and
a connection used from two threads (`monitor.misuse`) as log records whose `extra` fields
carry the structure: `pool`, `site`, `stack` (where the holder is *now*, innermost frame
last), `age_s`, `checkout_site`, `use_site`, `trace_id`/`span_id` (the OpenTelemetry span
the connection was checked out under), … A text log keeps only the message, so the
service also writes every record of the `monitor` loggers, one JSON object a line, to the
file named by `DEMO_MONITOR_EVENTS` (`DemoStack` sets it to `<log_dir>/monitor-events.jsonl`).
The runner reads them back and puts the alerts, stacks included, in the report.

Each record is one `os.write` on an `O_APPEND` descriptor, so the two workers' lines never
interleave. The text log (`service.log`) is unchanged: when nothing else handles the
`monitor` loggers, a stderr handler stands in for Python's last-resort one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_VAR = "DEMO_MONITOR_EVENTS"
LOGGER = "monitor"
LONG_HELD = "monitor.long_held"
MISUSE = "monitor.misuse"

#: The `extra` fields of the monitor's records (see monitor.watchdog and monitor.hooks).
FIELDS = (
    "pool",
    "age_s",
    "held_s",
    "site",
    "thread_name",
    "task_name",
    "backend_pid",
    "stack",
    "misuse",
    "checkout_thread",
    "use_thread",
    "other_thread",
    "checkout_site",
    "use_site",
    "trace_id",
    "span_id",
)


class JsonLinesHandler(logging.Handler):
    """Append each record as one JSON line: time, pid, logger, level, message and extras."""

    def __init__(self, path: str | Path, level: int = logging.INFO) -> None:
        super().__init__(level)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data: dict[str, Any] = {
                "time": record.created,
                "pid": os.getpid(),
                "logger": record.name,
                "level": record.levelname,
                "message": record.getMessage(),
            }
            data.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
            line = json.dumps(data, default=str) + "\n"
            os.write(self._fd, line.encode())
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


@contextlib.contextmanager
def capture(path: str | None) -> Iterator[None]:
    """While in the block, write the `monitor` loggers' records to `path` (no-op if None).

    `monitor.long_held` is lowered to INFO for the file, so the record that says how long
    an alerted connection was held in all ("returned after … s") is kept too; the stderr
    stand-in stays at WARNING, as the last-resort handler would.
    """
    if not path:
        yield
        return
    logger = logging.getLogger(LOGGER)
    long_held = logging.getLogger(LONG_HELD)
    handlers: list[logging.Handler] = [JsonLinesHandler(path)]
    if not logger.hasHandlers():  # keep the text in service.log, as without us
        text = logging.StreamHandler(sys.stderr)
        text.setLevel(logging.WARNING)
        text.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(text)
    previous_level = long_held.level
    if long_held.getEffectiveLevel() > logging.INFO:
        long_held.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        long_held.setLevel(previous_level)


def read(path: str | Path) -> list[dict[str, Any]]:
    """Every record in the file, oldest first; unreadable lines are skipped."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("time"), (int, float)):
                out.append(record)
    out.sort(key=lambda r: r["time"])
    return out
