"""The sidecar's HTTP surface (Starlette): metrics, health, JSON API, live page.

Handlers only read the latest scan and poll results (see `runtime`), so every request is
cheap and none touches the disk or the database. The one exception is `/api/checkouts`
(and `/api/blocking`, by the same rule), which may wait (at most
`postgres.REFRESH_WAIT_S`, in a worker thread) for the polling thread to refresh a view
older than `postgres.FRESH_S`: rate-limited and shared by all requests, see
`PostgresCollector.refresh`. `/metrics` never waits and never polls.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from monitor.sidecar import api, blocking
from monitor.sidecar.advice import advice_document
from monitor.sidecar.auth import COOKIE, cookie_value
from monitor.sidecar.runtime import Sidecar

STATIC = Path(__file__).with_name("static")
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def json_response(data: Any, status: int = 200) -> Response:
    """Strict JSON (a browser's JSON.parse rejects NaN), never cached."""
    try:
        body = json.dumps(data, allow_nan=False, default=str)
    except ValueError:
        body = json.dumps(_finite(data), allow_nan=False, default=str)
    return Response(
        body, status, media_type="application/json", headers={"Cache-Control": "no-store"}
    )


def _login_page(status: int, message: str, with_form: bool) -> HTMLResponse:
    form = (
        (
            '<form method="post" action="/login"><label>Token <input type="password" '
            'name="token" autocomplete="current-password" autofocus></label> '
            '<button type="submit">Open</button></form>'
        )
        if with_form
        else ""
    )
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>pool-monitor"
        "</title><link rel=stylesheet href=/static/live.css></head><body><h1>pool-monitor"
        f" sidecar</h1><p class=refusal>{html.escape(message)}</p>{form}</body></html>"
    )
    return HTMLResponse(body, status, headers=_SECURITY_HEADERS)


def create_app(sidecar: Sidecar, manage: bool = True) -> Starlette:
    """The ASGI app. With `manage`, the app's lifespan starts and stops the sidecar's
    threads (uvicorn runs it); tests pass False and call `sidecar.scan()` themselves."""
    page = (
        (STATIC / "index.html")
        .read_text(encoding="utf-8")
        .replace("{{REFRESH_MS}}", str(int(sidecar.config.page_refresh_s * 1000)))
    )
    access = sidecar.access

    def refused(request: Request, page_request: bool) -> Response | None:
        cookie = request.cookies.get(COOKIE)
        refusal = access.refusal(
            request.headers.get("authorization"), cookie, request.headers.get("host")
        )
        if refusal is None:
            return None
        status, message = refusal
        if page_request:
            return _login_page(status, message, with_form=access.token_required)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = json_response({"error": message}, status)
        if headers:
            response.headers.update(headers)
        return response

    async def index(request: Request) -> Response:
        return refused(request, True) or HTMLResponse(page, headers=_SECURITY_HEADERS)

    async def login(request: Request) -> Response:
        if not access.token_required:
            return RedirectResponse("/", 303)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        if not access.token_ok(token):
            return _login_page(401, "wrong token", with_form=True)
        response = RedirectResponse("/", 303)
        response.set_cookie(  # derived from the token, never the token itself (see auth)
            COOKIE,
            cookie_value(token),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def pools(request: Request) -> Response:
        return refused(request, False) or json_response(api.pools(sidecar.view, sidecar.pg.view))

    async def advice(request: Request) -> Response:
        return refused(request, False) or json_response(
            advice_document(sidecar.advice, sidecar.pg.view)
        )

    async def checkouts(request: Request) -> Response:
        refusal = refused(request, False)
        if refusal is not None:
            return refusal
        try:
            limit = api.checkouts_limit(request.query_params.get("limit"))
        except ValueError as exc:
            return json_response({"error": str(exc)}, status=400)
        if request.query_params.get("server") == "cached":
            # The live page's fast loop: holds as of now, joined only with the cached poll
            # (rows older than 0.5 s stay unknown), never waiting and never asking for a
            # poll, so an ended hold leaves the page as fast as it leaves this list.
            pg = sidecar.pg.view
        else:
            pg = await run_in_threadpool(sidecar.pg.refresh, since=api.newest_start(sidecar.view))
        # The holds as of now, not as of before the wait: a hold that ended while the
        # poll ran must not be listed (a hold newer than the poll is joined as unknown).
        view = sidecar.view
        response = json_response(
            api.checkouts(
                view,
                pg,
                sidecar.config.show_query_text,
                limit=limit,
                trace_url_template=sidecar.config.trace_url_template,
            )
        )
        response.headers["X-Total-Count"] = str(len(view.holds))  # before the limit
        return response

    async def blocking_tree(request: Request) -> Response:
        # Who blocks whom: the same freshness rule as /api/checkouts (a poll that started
        # <= 0.4 s ago and after the newest hold began, asked for, rate-limited and
        # shared), so a lock is pinned only on the hold that row describes.
        refusal = refused(request, False)
        if refusal is not None:
            return refusal
        pg = await run_in_threadpool(sidecar.pg.refresh, since=api.newest_start(sidecar.view))
        tree = await run_in_threadpool(
            blocking.tree, sidecar.view, pg, trace_url_template=sidecar.config.trace_url_template
        )
        return json_response(tree)

    async def metrics(request: Request) -> Response:
        # Off the event loop: the collectors only read memory, but a pile-up's blocking
        # forest or a large merge takes milliseconds that /healthz must not wait for.
        body, media_type = await run_in_threadpool(
            sidecar.registries.render, request.headers.get("accept")
        )
        return Response(body, media_type=media_type)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, detail = sidecar.readiness()
        return json_response(detail, 200 if ready else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage:
            sidecar.start()
        try:
            yield
        finally:
            if manage:
                sidecar.stop()

    return Starlette(
        routes=[
            Route("/", index),
            Route("/login", login, methods=["POST"]),
            Route("/api/pools", pools),
            Route("/api/checkouts", checkouts),
            Route("/api/blocking", blocking_tree),
            Route("/api/advice", advice),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
