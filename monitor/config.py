"""Settings for `instrument()`: keyword arguments, with `POOL_MONITOR_*` variables as defaults.

Everything is validated once, at `instrument()` time, so a typo in a deployment fails at
start-up with a message that names the setting, instead of quietly disabling a feature.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "POOL_MONITOR_"


class ConfigError(ValueError):
    """An invalid pool-monitor setting; the message names the setting and what it accepts."""


@dataclass(frozen=True)
class Settings:
    """Validated settings for one instrumented pool."""

    #: Seconds a connection may stay checked out before a long-held alert; 0 disables.
    long_held_threshold: float = 5.0
    #: Attribute each checkout to the code site that made it (about 0.7 µs per checkout;
    #: off, every site is `unknown` and misuse is still detected).
    code_sites: bool = True
    #: How many code sites get their own series per pool; the rest are summed as `other`.
    max_sites: int = 50
    #: Path prefixes whose frames never count as the code site (in addition to
    #: SQLAlchemy, pool-monitor, the standard library and site-packages).
    site_exclude: tuple[str, ...] = ()
    #: Path prefixes that count as user code even under site-packages (an app installed
    #: as a package, say).
    site_include: tuple[str, ...] = ()
    #: Directory for this process's snapshot file (read by the sidecar); None disables.
    snapshot_dir: str | None = None
    #: Seconds between snapshot writes.
    snapshot_interval: float = 1.0
    #: Record the trace and span ids of the OpenTelemetry span current at each checkout
    #: (when opentelemetry-api is installed): holds, long-held alerts and misuse warnings
    #: name the request, and the hold- and wait-time histograms carry exemplars.
    trace_context: bool = True
    #: Emit a `pool.wait` span, a child of the current span, around every checkout made
    #: under a sampled trace: a trace then shows the time lost waiting for the pool.
    trace_pool_wait: bool = False
    #: Seconds a histogram bucket keeps its exemplar against faster ones: set it to about
    #: the scrape interval, so each scrape sees the slowest observation since the last.
    exemplar_window: float = 15.0
    #: Called (off the hot path, in the watchdog thread) for each long-held alert.
    on_long_held: tuple[Callable[[Any], None], ...] = field(default=(), compare=False)


_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "long_held_threshold": (0.0, 86400.0),
    "snapshot_interval": (0.05, 3600.0),
    "exemplar_window": (0.1, 3600.0),
}
_INT_RANGES: dict[str, tuple[int, int]] = {"max_sites": (1, 10000)}


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_float(name: str, raw: object) -> float:
    low, high = _FLOAT_RANGES[name]
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be a number of seconds from {low:g} to {high:g}, got {raw!r}"
        ) from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be from {low:g} to {high:g} seconds, got {value:g}")
    return value


def _parse_int(name: str, raw: object) -> int:
    low, high = _INT_RANGES[name]
    if isinstance(raw, bool):
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    try:
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise ConfigError(
            f"{name} must be a whole number from {low} to {high}, got {raw!r}"
        ) from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be from {low} to {high}, got {value}")
    return value


def _parse_prefixes(name: str, raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.replace(os.pathsep, ",").split(",")]
        return tuple(p for p in parts if p)
    if isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
        return tuple(raw)
    raise ConfigError(
        f"{name} must be a list of path prefixes (or a comma-separated string), got {raw!r}"
    )


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{name} must be true or false (1/0, yes/no, on/off), got {raw!r}")


def _parse_callbacks(raw: object) -> tuple[Callable[[Any], None], ...]:
    items = raw if isinstance(raw, (list, tuple)) else (raw,)
    for item in items:
        if not callable(item):
            raise ConfigError(
                f"on_long_held must be a callable or a list of callables, got {item!r}"
            )
    return tuple(items)  # type: ignore[arg-type]


def _parse(name: str, raw: object) -> object:
    if name in _FLOAT_RANGES:
        return _parse_float(name, raw)
    if name in _INT_RANGES:
        return _parse_int(name, raw)
    if name in ("code_sites", "trace_context", "trace_pool_wait"):
        return _parse_bool(name, raw)
    if name in ("site_exclude", "site_include"):
        return _parse_prefixes(name, raw)
    if name == "snapshot_dir":
        if raw is None or raw == "":
            return None
        if not isinstance(raw, (str, os.PathLike)):
            raise ConfigError(f"snapshot_dir must be a directory path, got {raw!r}")
        return os.fspath(raw)
    if name == "on_long_held":
        return _parse_callbacks(raw)
    raise AssertionError(name)  # pragma: no cover


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))
_ENV_SETTINGS = tuple(n for n in SETTING_NAMES if n != "on_long_held")


def load_settings(
    overrides: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge keyword overrides over `POOL_MONITOR_*` variables over defaults; validate all."""
    environ = os.environ if environ is None else environ
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}"
        )
    values: dict[str, object] = {}
    for name in _ENV_SETTINGS:
        env = environ.get(_env_name(name))
        if env is not None:
            try:
                values[name] = _parse(name, env)
            except ConfigError as exc:
                raise ConfigError(f"{_env_name(name)}: {exc}") from None
    for name, raw in overrides.items():
        values[name] = _parse(name, raw)
    return Settings(**values)  # type: ignore[arg-type]
