"""VNC tickets: single use, bound to one session, gone after their lifetime, never stored in the clear."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from polydev.core.vnc_tickets import VncTickets
from polydev.store.sessions import MemorySessionStore, RedisSessionStore
from tests.support.clock import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def tickets(clock: ManualClock) -> VncTickets:
    return VncTickets(MemorySessionStore(600, clock=clock), ttl_seconds=30)


async def test_a_ticket_works_once_for_its_user_and_session(tickets: VncTickets) -> None:
    user, session = uuid.uuid4(), uuid.uuid4()
    ticket = await tickets.issue(user, session)
    assert ticket.expires_in == 30 and len(ticket.secret) >= 40
    assert await tickets.redeem(ticket.secret, session) == user
    assert await tickets.redeem(ticket.secret, session) is None  # used up


async def test_a_ticket_expires(tickets: VncTickets, clock: ManualClock) -> None:
    session = uuid.uuid4()
    ticket = await tickets.issue(uuid.uuid4(), session)
    clock.now += 30.5
    assert await tickets.redeem(ticket.secret, session) is None


async def test_a_ticket_for_another_session_is_refused_and_used_up(tickets: VncTickets) -> None:
    session = uuid.uuid4()
    ticket = await tickets.issue(uuid.uuid4(), session)
    assert await tickets.redeem(ticket.secret, uuid.uuid4()) is None
    assert await tickets.redeem(ticket.secret, session) is None


async def test_unknown_and_empty_tickets_are_refused(tickets: VncTickets) -> None:
    session = uuid.uuid4()
    await tickets.issue(uuid.uuid4(), session)
    for bad in ("", "x" * 500, "not-a-ticket"):
        assert await tickets.redeem(bad, session) is None


async def test_the_store_never_holds_the_ticket_itself(tickets: VncTickets) -> None:
    ticket = await tickets.issue(uuid.uuid4(), uuid.uuid4())
    store = tickets.store
    assert isinstance(store, MemorySessionStore)
    assert all(ticket.secret not in key and ticket.secret not in raw for key, (_, raw) in store._items.items())


def test_lifetime_is_bounded() -> None:
    with pytest.raises(ValueError):
        VncTickets(MemorySessionStore(600), ttl_seconds=61)


@pytest.mark.redis
async def test_two_replicas_racing_for_one_ticket_let_one_through(redis_server: str) -> None:
    # Two control-plane replicas sharing Redis: a ticket minted on one is redeemed on the other, and of
    # many concurrent redemptions exactly one wins.
    a = VncTickets(RedisSessionStore.from_url(redis_server, 600), 30)
    b = VncTickets(RedisSessionStore.from_url(redis_server, 600), 30)
    try:
        user, session = uuid.uuid4(), uuid.uuid4()
        ticket = await a.issue(user, session)
        results = await asyncio.gather(*(t.redeem(ticket.secret, session) for t in (a, b) * 5))
        assert results.count(user) == 1 and results.count(None) == 9
    finally:
        await a.store.close()
        await b.store.close()
