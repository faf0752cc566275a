"""WorkSlots: a worker's slots and bounded queue, first come first served, refusals that say why."""

from __future__ import annotations

import asyncio

import pytest

from services.common.admission import WorkSlots
from services.common.errors import Busy, Draining


def run(coro):
    return asyncio.run(coro)


def test_calls_beyond_slots_and_queue_are_refused_busy_naming_the_load():
    async def go():
        slots = WorkSlots(capacity=1, max_queued=1)
        first, second = slots.enter(), slots.enter()
        assert first.granted and not second.granted and second.position == 1
        with pytest.raises(Busy) as info:
            slots.enter("window")
        assert "1 windows running and 1 waiting" in str(info.value) and info.value.retry == "busy"
        return slots.running, slots.queued

    assert run(go()) == (1, 1)


def test_a_released_slot_goes_to_the_oldest_waiter():
    async def go():
        slots = WorkSlots(capacity=1, max_queued=3)
        running = slots.enter()
        waiters = [slots.enter() for _ in range(3)]
        assert [w.position for w in waiters] == [1, 2, 3]
        running.release()
        assert await waiters[0].turn(0.1) and not await waiters[1].turn(0.01)
        assert [w.position for w in waiters] == [0, 1, 2]

    run(go())


def test_a_waiter_that_leaves_gives_up_its_place():
    async def go():
        slots = WorkSlots(capacity=1, max_queued=2)
        running, gone, next_ = slots.enter(), slots.enter(), slots.enter()
        gone.release()
        assert next_.position == 1
        running.release()
        assert await next_.turn(0.1) and slots.running == 1 and slots.queued == 0

    run(go())


def test_drain_refuses_waiting_and_new_calls_and_waits_for_running_ones():
    async def go():
        slots = WorkSlots(capacity=1, max_queued=1)
        running, waiting = slots.enter(), slots.enter()
        slots.drain()
        with pytest.raises(Draining):
            await waiting.turn(0.1)
        with pytest.raises(Draining):
            slots.enter()
        assert not await slots.wait_idle(0.05)
        running.release()
        assert await slots.wait_idle(0.05)

    run(go())


def test_every_change_is_announced():
    async def go():
        changes = []
        slots = WorkSlots(capacity=1, max_queued=1, on_change=lambda: changes.append((slots.running, slots.queued)))
        async with slots.admit():
            pass
        return changes

    assert run(go()) == [(1, 0), (0, 0)]
