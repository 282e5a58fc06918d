"""The demo service over real HTTP: uvicorn on 127.0.0.1, the fake external API likewise.

Time-scaled: the external API answers in 0.3 s, so the API pool times out after 0.15 s.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from demo_app import external, service
from demo_app.schema import create_schema
from demo_app.servers import serve_in_thread
from demo_app.settings import DemoSettings

LATENCY_S = 0.3


@pytest.fixture(scope="module")
def base_url(database_url: str) -> Iterator[str]:
    create_schema(database_url)
    with serve_in_thread(external.create_app(LATENCY_S)) as external_url:
        settings = DemoSettings.scaled(database_url, external_url, LATENCY_S)
        with serve_in_thread(service.create_app(settings)) as url:
            yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        yield http


async def test_index_health_and_worker_snapshot(client: httpx.AsyncClient) -> None:
    index = (await client.get("/")).json()
    assert set(index["scenarios"]) >= {"external_call", "lost_update", "session_store"}
    assert (await client.get("/healthz")).json()["status"] == "ok"
    snap = (await client.get("/demo/monitor")).json()
    assert set(snap["pools"]) == {"api", "background", "shared", "worker"}
    assert snap["pools"]["api"]["gauges"]["db.client.connection.max"] == 3
    assert isinstance(snap["pid"], int)


async def test_metrics_expose_every_pool(client: httpx.AsyncClient) -> None:
    await client.post("/external_call/three_stage/images")
    response = await client.get("/metrics", follow_redirects=True)
    assert response.status_code == 200
    text = response.text
    assert "db_client_connection_use_time_seconds" in text
    for pool in ("api", "background", "shared", "worker"):
        assert f'db_client_connection_pool_name="{pool}"' in text


async def test_unknown_variant_is_404_and_bad_input_400(client: httpx.AsyncClient) -> None:
    assert (await client.post("/external_call/nope/images")).status_code == 404
    bad = await client.post("/lost_update/naive/run", json={"threads": 10_000})
    assert bad.status_code == 400 and "threads" in bad.json()["error"]
    no_key = await client.post("/idempotent_payment/idempotent/payments", json={"amount": "1"})
    assert no_key.status_code == 400


async def _burst(client: httpx.AsyncClient, path: str, n: int) -> Counter[int]:
    responses = await asyncio.gather(*(client.post(path) for _ in range(n)))
    return Counter(r.status_code for r in responses)


async def test_external_call_anti_times_out_and_three_stage_serves_all(
    client: httpx.AsyncClient,
) -> None:
    anti = await _burst(client, "/external_call/anti/images", 12)
    assert anti[503] > 0 and anti[200] > 0 and set(anti) <= {200, 503}
    fixed = await _burst(client, "/external_call/three_stage/images", 12)
    assert fixed == Counter({200: 12})


async def test_duplicate_rows_routes(client: httpx.AsyncClient) -> None:
    task_id = f"http-{uuid.uuid4().hex[:8]}"
    for name in ("first", "retry"):
        response = await client.post(
            "/duplicate_rows/projects", json={"task_id": task_id, "name": name}
        )
        assert response.status_code == 201
    unsafe = await client.get(f"/duplicate_rows/unsafe/projects/{task_id}")
    assert unsafe.status_code == 500
    assert unsafe.json()["error"] == "MultipleResultsFound"
    safe = await client.get(f"/duplicate_rows/safe/projects/{task_id}")
    assert safe.status_code == 200 and safe.json()["name"] == "retry"
    missing = await client.get(f"/duplicate_rows/safe/projects/{task_id}-x")
    assert missing.status_code == 404
    dups = await client.get("/duplicate_rows/duplicates", params={"prefix": task_id})
    assert dups.json() == {task_id: 2}


async def _pay(client: httpx.AsyncClient, variant: str, key: str, retries: int) -> list[int]:
    order = {"order_number": f"order-{key}", "amount": "2500.00"}
    assert (await client.post("/idempotent_payment/orders", json=order)).status_code == 201
    responses = await asyncio.gather(
        *(
            client.post(
                f"/idempotent_payment/{variant}/payments",
                headers={"Idempotency-Key": key},
                json=order,
            )
            for _ in range(retries)
        )
    )
    return sorted(r.status_code for r in responses)


async def test_payment_routes_naive_double_charges_idempotent_once(
    client: httpx.AsyncClient,
) -> None:
    naive_key, idem_key = f"n-{uuid.uuid4().hex[:8]}", f"i-{uuid.uuid4().hex[:8]}"
    assert await _pay(client, "naive", naive_key, 3) == [200, 200, 200]
    assert await _pay(client, "idempotent", idem_key, 3) == [200, 409, 409]
    charges = (await client.get("/idempotent_payment/charges")).json()
    assert charges[naive_key] == 3
    assert charges[idem_key] == 1
    replay = await client.post(
        "/idempotent_payment/idempotent/payments",
        headers={"Idempotency-Key": idem_key},
        json={"order_number": f"order-{idem_key}", "amount": "2500.00"},
    )
    assert replay.status_code == 200 and replay.json()["replayed"] is True


async def test_lost_update_routes(client: httpx.AsyncClient) -> None:
    results = {}
    for variant in ("naive", "pessimistic", "optimistic"):
        response = await client.post(f"/lost_update/{variant}/run", json={})
        assert response.status_code == 200
        results[variant] = response.json()
    assert results["naive"]["actual"] < 50
    assert results["pessimistic"]["actual"] == results["optimistic"]["actual"] == 50
    assert all(r["expected"] == 50 and r["errors"] == [] for r in results.values())


async def test_shared_session_routes(client: httpx.AsyncClient) -> None:
    body = {"runs": 2, "steps": 6}
    shared = (await client.post("/shared_session/shared/run", json=body)).json()
    factory = (await client.post("/shared_session/factory/run", json=body)).json()
    # One session, two threads: its connections change threads (handed over, or taken in
    # turns, or overlapped); with a factory, never.
    assert shared["handoffs"] + shared["cross_thread_uses"] + shared["concurrent_uses"] > 0
    assert all(":shared_" in site for site in shared["cross_thread_sites"])
    assert factory["handoffs"] == factory["cross_thread_uses"] == factory["concurrent_uses"] == 0
    assert factory["errors"] == 0


async def test_session_store_routes(client: httpx.AsyncClient) -> None:
    body = {"threads": 8, "sessions": 2, "writes": 200}
    unlocked = (await client.post("/session_store/unlocked/run", json=body)).json()
    locked = (await client.post("/session_store/locked/run", json=body)).json()
    assert unlocked["lost_writes"] > 0 and unlocked["lock_waits"] == 0
    assert locked["lost_writes"] == 0 and locked["stored"] == 200
    assert locked["lock_waits"] >= 200 and locked["lock_wait_p99_s"] is not None


async def test_pool_isolation_routes(client: httpx.AsyncClient) -> None:
    for variant in ("shared", "split"):
        queued = await client.post(f"/pool_isolation/{variant}/jobs")
        assert queued.status_code == 202
        task_id = queued.json()["task_id"]
        for _ in range(100):  # bounded: the job takes one external call (0.3 s)
            jobs = (await client.get(f"/pool_isolation/{variant}/jobs/recent")).json()["jobs"]
            if {"task_id": task_id, "status": "completed"} in jobs:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"{variant} job {task_id} did not complete")
    for _ in range(100):  # the tracker counts a job done just after its commit
        counts = (await client.get("/demo/monitor")).json()["jobs"]
        if counts["in_flight"] == {"shared": 0, "split": 0}:
            break
        await asyncio.sleep(0.05)
    assert counts["ok"] == {"shared": 1, "split": 1}
    assert counts["in_flight"] == {"shared": 0, "split": 0}
