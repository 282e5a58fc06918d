"""httpx clients for the fake external services (the seed's `ImageProcessorService` and
`PaymentGatewayService`), and the loopback guard every demo client goes through.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit

import httpx

from demo_app.external import CLIENT_KEY_HEADER

#: Every demo client drops an idle keep-alive connection after this long: well before
#: uvicorn closes it (`timeout_keep_alive`, 5 s). With both at 5 s (httpx's default) a
#: request can go out on a connection the server is closing at that instant and fail with
#: a transport error (`ReadError`), more often on a busy CPU: a failure of the demo's
#: plumbing, not of the pool under test (seen once as a payment whose gateway call failed,
#: so its key was never charged).
KEEPALIVE_EXPIRY_S = 2.0


def ensure_loopback(url: str) -> str:
    """Refuse any URL whose host is not loopback: the demo never generates load elsewhere."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return url
    try:
        if ipaddress.ip_address(host).is_loopback:
            return url
    except ValueError:
        pass
    raise ValueError(f"demo traffic is loopback-only; refusing {url!r}")


def external_http_client(latency_s: float) -> httpx.AsyncClient:
    """One shared client per service process: enough connections for every request in flight."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(latency_s * 5 + 10.0, connect=5.0),
        limits=httpx.Limits(
            max_connections=1000,
            max_keepalive_connections=200,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        ),
    )


@dataclass(frozen=True)
class ProcessingResult:
    processed_url: str
    width: int
    height: int
    file_size: int
    processing_time: float


@dataclass(frozen=True)
class PaymentResult:
    transaction_id: str
    status: str
    message: str


class ImageProcessorClient:
    """Calls the external image processor. It is slow: never call it while holding a session."""

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self._http = http
        self._base_url = ensure_loopback(base_url).rstrip("/")

    async def process_image(self, image_url: str, options: dict | None = None) -> ProcessingResult:
        response = await self._http.post(
            f"{self._base_url}/process", json={"image_url": image_url, "options": options or {}}
        )
        response.raise_for_status()
        data = response.json()
        return ProcessingResult(
            processed_url=data["processed_url"],
            width=data["width"],
            height=data["height"],
            file_size=data["file_size"],
            processing_time=data["processing_time"],
        )


class PaymentGatewayClient:
    """Calls the external payment gateway; every successful call is a charge."""

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self._http = http
        self._base_url = ensure_loopback(base_url).rstrip("/")

    async def process_payment(
        self, payment_id: str, amount: Decimal, currency: str, card_token: str, key: str
    ) -> PaymentResult:
        response = await self._http.post(
            f"{self._base_url}/v1/payments",
            headers={CLIENT_KEY_HEADER: key},
            json={
                "merchant_uid": payment_id,
                "amount": float(amount),
                "currency": currency,
                "card_token": card_token,
            },
        )
        response.raise_for_status()
        data = response.json()
        return PaymentResult(data["transaction_id"], data["status"], data.get("message", ""))
