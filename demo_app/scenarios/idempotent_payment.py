"""Seed 002, scenario 2: payments retried by clients, with and without idempotency.

Clients retry a payment when the gateway is slow, often while the first attempt is still
running, so retries of one key arrive *concurrently*. Both variants use the seed's 3-stage
pattern (no connection held during the gateway call); they differ in protection:

* `naive` – every request creates its own payment and charges the card: a key retried three
  times is charged three times.
* `idempotent` – the request first claims its `Idempotency-Key` with
  `INSERT … ON CONFLICT (key) DO NOTHING RETURNING`, in the same transaction as the payment
  row. The primary key makes PostgreSQL pick exactly one owner even for simultaneous
  retries (the others wait on the index entry, then see the conflict); non-owners replay
  the stored payment instead of charging. A check-then-insert (`SELECT`, then `INSERT`)
  would let two concurrent retries both pass the check.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from demo_app.clients import PaymentGatewayClient
from demo_app.models import IdempotencyKey, Order, Payment


class PaymentRejected(Exception):
    """The order is unknown or the amount does not match (the seed's 404 / 400)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class PaymentOutcome:
    payment_id: str
    status: str
    transaction_id: str | None
    replayed: bool = False


async def create_order(
    sessions: async_sessionmaker[AsyncSession], order_number: str, amount: Decimal
) -> int:
    async with sessions() as session:
        order = Order(order_number=order_number, customer_id="demo", total_amount=amount)
        session.add(order)
        await session.commit()
        return order.id


async def _find_order(session: AsyncSession, order_number: str, amount: Decimal) -> Order:
    order = (
        await session.execute(select(Order).where(Order.order_number == order_number).limit(1))
    ).scalar_one_or_none()
    if order is None:
        raise PaymentRejected(404, f"order {order_number!r} not found")
    if order.total_amount != amount:
        raise PaymentRejected(400, "amount does not match the order")
    return order


async def naive_process_payment(
    sessions: async_sessionmaker[AsyncSession],
    gateway: PaymentGatewayClient,
    order_number: str,
    amount: Decimal,
    idempotency_key: str,
    card_token: str = "tok_demo",
) -> PaymentOutcome:
    """❌ No protection: each (retried) request is a new payment and a new charge."""
    payment_id = f"PAY-{uuid.uuid4()}"
    async with sessions() as session:  # stage 1
        order = await _find_order(session, order_number, amount)
        payment = Payment(
            payment_id=payment_id,
            order_id=order.id,
            idempotency_key=idempotency_key,
            amount=amount,
            status="processing",
        )
        session.add(payment)
        order.status = "payment_processing"
        await session.commit()
        payment_db_id, order_id = payment.id, order.id

    result = await gateway.process_payment(  # stage 2: no session
        payment_id, amount, "KRW", card_token, idempotency_key
    )

    async with sessions() as session:  # stage 3
        stored = (
            await session.execute(select(Payment).where(Payment.id == payment_db_id))
        ).scalar_one()
        stored.status = "completed" if result.status == "success" else "failed"
        stored.gateway_transaction_id = result.transaction_id
        order = (await session.execute(select(Order).where(Order.id == order_id))).scalar_one()
        order.status = "paid" if result.status == "success" else "payment_failed"
        await session.commit()
        return PaymentOutcome(payment_id, stored.status, stored.gateway_transaction_id)


async def idempotent_process_payment(
    sessions: async_sessionmaker[AsyncSession],
    gateway: PaymentGatewayClient,
    order_number: str,
    amount: Decimal,
    idempotency_key: str,
    card_token: str = "tok_demo",
) -> PaymentOutcome:
    """✅ One owner per key (unique constraint + ON CONFLICT); everyone else replays."""
    payment_id = f"PAY-{idempotency_key}"
    async with sessions() as session:  # stage 1: claim the key and create the payment, atomically
        claimed = await session.execute(
            pg_insert(IdempotencyKey)
            .values(key=idempotency_key, payment_id=payment_id)
            .on_conflict_do_nothing(index_elements=[IdempotencyKey.key])
            .returning(IdempotencyKey.key)
        )
        if claimed.scalar_one_or_none() is None:
            await session.rollback()
            existing = (
                await session.execute(select(Payment).where(Payment.payment_id == payment_id))
            ).scalar_one_or_none()
            status = existing.status if existing else "processing"
            tx = existing.gateway_transaction_id if existing else None
            return PaymentOutcome(payment_id, status, tx, replayed=True)
        order = await _find_order(session, order_number, amount)  # raising rolls the claim back
        payment = Payment(
            payment_id=payment_id,
            order_id=order.id,
            idempotency_key=idempotency_key,
            amount=amount,
            status="processing",
        )
        session.add(payment)
        order.status = "payment_processing"
        await session.commit()
        payment_db_id, order_id = payment.id, order.id

    try:  # stage 2: no session
        result = await gateway.process_payment(
            payment_id, amount, "KRW", card_token, idempotency_key
        )
    except Exception as exc:
        async with sessions() as session:
            failed = (
                await session.execute(select(Payment).where(Payment.id == payment_db_id))
            ).scalar_one()
            failed.status = "failed"
            failed.error_message = str(exc)
            await session.commit()
        raise

    async with sessions() as session:  # stage 3
        stored = (
            await session.execute(select(Payment).where(Payment.id == payment_db_id))
        ).scalar_one()
        stored.status = "completed" if result.status == "success" else "failed"
        stored.gateway_transaction_id = result.transaction_id
        order = (await session.execute(select(Order).where(Order.id == order_id))).scalar_one()
        order.status = "paid" if result.status == "success" else "payment_failed"
        await session.commit()
        return PaymentOutcome(payment_id, stored.status, stored.gateway_transaction_id)


async def charges_per_key(
    sessions: async_sessionmaker[AsyncSession], key_prefix: str
) -> dict[str, int]:
    """Ground truth from the database: charged payments (with a gateway transaction) per key."""
    async with sessions() as session:
        rows = await session.execute(
            select(Payment.idempotency_key, func.count())
            .where(
                Payment.idempotency_key.startswith(key_prefix),
                Payment.gateway_transaction_id.is_not(None),
            )
            .group_by(Payment.idempotency_key)
        )
        return {key: n for key, n in rows}


VARIANTS = {"naive": naive_process_payment, "idempotent": idempotent_process_payment}
