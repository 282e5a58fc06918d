"""A small async load generator: virtual users in a closed loop, bounded in count and time.

Each of `concurrency` users sends a request, waits for the answer, (optionally thinks),
and sends the next, until `duration_s` has passed or `max_requests` were started; whichever
comes first. In-flight requests are then awaited, each bounded by the client's timeout,
and the whole run by a hard deadline. Only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from demo_app.clients import KEEPALIVE_EXPIRY_S, ensure_loopback

Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]
Progress = Callable[[int, int], None]


@dataclass
class LoadResult:
    """What the clients saw. `ok` is 2xx; everything else (and transport errors) failed."""

    requests: int = 0
    ok: int = 0
    failed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ok_s: list[float] = field(default_factory=list)
    latencies_all_s: list[float] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def duration_s(self) -> float:
        return max(self.finished_at - self.started_at, 1e-9)

    @property
    def throughput_rps(self) -> float:
        """Successful requests per second over the whole run."""
        return self.ok / self.duration_s

    def latency_quantile(self, q: float, *, ok_only: bool = False) -> float | None:
        values = sorted(self.latencies_ok_s if ok_only else self.latencies_all_s)
        if not values:
            return None
        index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))  # nearest rank
        return values[index]

    def record(self, status: str, ok: bool, latency: float) -> None:
        self.requests += 1
        self.statuses[status] += 1
        self.latencies_all_s.append(latency)
        if ok:
            self.ok += 1
            self.latencies_ok_s.append(latency)
        else:
            self.failed += 1


def client(
    base_url: str, concurrency: int, timeout_s: float, *, keep_alive: bool = True
) -> httpx.AsyncClient:
    """A client sized for `concurrency` users against a loopback service.

    Keep-alive pins a connection, and so a user, to one uvicorn worker. Requests that are
    few and sequential (a job producer) should go without it, so the kernel spreads them
    over the workers as it does for many independent clients.
    """
    keep = concurrency + 8 if keep_alive else 0
    return httpx.AsyncClient(
        base_url=ensure_loopback(base_url),
        timeout=httpx.Timeout(timeout_s, connect=5.0),
        limits=httpx.Limits(
            max_connections=concurrency + 8,
            max_keepalive_connections=keep,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        ),
    )


async def closed_loop(
    http: httpx.AsyncClient,
    request: Request,
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    think_s: float = 0.0,
    ramp_s: float = 0.0,
    on_progress: Progress | None = None,
    grace_s: float = 60.0,
) -> LoadResult:
    """Run `concurrency` users for at most `duration_s` and `max_requests` requests.

    With `ramp_s`, user k starts at k·ramp_s/concurrency instead of all at once, as a real
    population of clients does (and as load tools do), so the first requests do not
    arrive as one synchronized burst.
    """
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration_s and max_requests must be positive")
    result = LoadResult(started_at=time.monotonic())
    stop_at = result.started_at + duration_s
    issued = 0

    async def user(k: int) -> None:
        nonlocal issued
        if ramp_s:
            await asyncio.sleep(k * ramp_s / concurrency)
        while time.monotonic() < stop_at and issued < max_requests:
            number = issued
            issued += 1
            t0 = time.monotonic()
            try:
                response = await request(http, number)
                status, ok = str(response.status_code), response.is_success
            except httpx.HTTPError as exc:
                status, ok = type(exc).__name__, False
            result.record(status, ok, time.monotonic() - t0)
            if on_progress:
                on_progress(result.requests, result.failed)
            if think_s:
                await asyncio.sleep(think_s)

    users = [asyncio.create_task(user(k)) for k in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*users), timeout=duration_s + grace_s)
    except asyncio.TimeoutError:
        for task in users:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    result.finished_at = time.monotonic()
    return result


async def burst(
    http: httpx.AsyncClient, requests: list[Request], *, timeout_s: float = 60.0
) -> list[httpx.Response | Exception]:
    """Send these requests all at once (e.g. concurrent retries of one payment)."""
    calls = [r(http, i) for i, r in enumerate(requests)]
    return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_s)
