"""Unit tests of the limits core (token bucket, sliding window, per-key quotas, admission gate): no server, no engine;
time comes from a fake clock and asyncio runs under `asyncio.run`."""

from __future__ import annotations

import asyncio
import math

import pytest

from interpgw.core.errors import ResourceExhausted
from interpgw.limits import AdmissionGate, Quota, QuotaBook, SlidingWindowBudget, TokenBucket


class FakeClock:
    """Monotonic time that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------- TokenBucket


def test_bucket_allows_a_burst_then_the_rate_with_the_exact_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=5, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.2)  # one token refills in 1/5 s
    clock.advance(0.1)
    assert bucket.take() == pytest.approx(0.1)  # the refused take consumed nothing
    clock.advance(0.1)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.2)


def test_bucket_refills_to_the_burst_and_no_further() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10, burst=2, clock=clock)
    bucket.take(2)
    clock.advance(3600)
    assert bucket.take(2) == 0.0
    assert bucket.take() == pytest.approx(0.1)


def test_bucket_waits_for_several_tokens_and_never_for_more_than_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2, burst=4, clock=clock)
    assert bucket.take(3) == 0.0
    assert bucket.take(3) == pytest.approx(1.0)  # 1 left, 2 more at 2/s
    assert bucket.take(5) == math.inf
    with pytest.raises(ValueError, match="rate_per_s > 0"):
        TokenBucket(0, 1)


def test_bucket_sustained_rate_matches_the_configured_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=5, burst=1, clock=clock)
    admitted = 0
    for _ in range(1000):  # try every 10 ms for 10 s
        admitted += bucket.take() == 0.0
        clock.advance(0.01)
    assert admitted in (50, 51)


# ---------------------------------------------------------------------- SlidingWindowBudget


def test_window_accepts_up_to_the_limit_then_tells_when_room_frees() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindowBudget(100, window_s=60, clock=clock)
    assert window.charge(60) == 0.0
    clock.advance(30)
    assert window.charge(40) == 0.0
    assert window.used() == 100
    assert window.charge(10) == pytest.approx(30.0)  # the 60 charged at t=0 leave at t=60
    assert window.used() == 100  # nothing recorded by the refusal
    clock.advance(30)
    assert window.used() == 40
    assert window.charge(60) == 0.0
    clock.advance(30)
    assert window.used() == 60


def test_window_never_accepts_more_than_the_whole_limit() -> None:
    window = SlidingWindowBudget(100, clock=FakeClock())
    assert window.charge(101) == math.inf
    assert window.used() == 0
    assert window.charge(100) == 0.0


def test_window_wait_is_until_enough_old_charges_expire() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindowBudget(100, window_s=60, clock=clock)
    for _ in range(5):
        window.charge(20)
        clock.advance(10)
    # now t=50: 20 at t=0, 10, 20, 30, 40; 50 more needs the charges of t=0, 10 and 20 gone: at t=80
    assert window.charge(50) == pytest.approx(30.0)


def test_window_memory_is_bounded_by_its_slots() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindowBudget(10**12, window_s=60, clock=clock)
    for _ in range(100_000):
        assert window.charge(1) == 0.0
        clock.advance(0.003)
    assert len(window._charges) <= 60
    assert window.used() == pytest.approx(60 / 0.003, rel=0.02)


# ---------------------------------------------------------------------- Quota and QuotaBook


def test_quota_burst_defaults_from_the_rate_and_values_are_checked() -> None:
    assert Quota(requests_per_s=0.5).effective_burst == 1
    assert Quota(requests_per_s=2.5).effective_burst == 3
    assert Quota(requests_per_s=2, burst=10).effective_burst == 10
    assert Quota().effective_burst is None
    with pytest.raises(ValueError, match="max_concurrent must be >= 1"):
        Quota(max_concurrent=0)
    with pytest.raises(ValueError, match="requests_per_s must be > 0"):
        Quota(requests_per_s=-1)


def test_unlimited_quota_admits_everything() -> None:
    book = QuotaBook(clock=FakeClock())
    tickets = [book.acquire("k", Quota()) for _ in range(1000)]
    book.charge_capture("k", Quota(), 10**15)
    assert book.in_flight("k") == 1000
    for ticket in tickets:
        ticket.release()
    assert book.in_flight("k") == 0


def test_concurrency_limit_and_idempotent_release() -> None:
    book = QuotaBook(clock=FakeClock())
    quota = Quota(max_concurrent=2)
    first, second = book.acquire("k", quota), book.acquire("k", quota)
    with pytest.raises(ResourceExhausted, match="concurrency limit of 2 requests in flight") as refused:
        book.acquire("k", quota)
    assert refused.value.retry_after_s == 1.0
    first.release()
    first.release()  # a second release frees nothing more
    assert book.in_flight("k") == 1 and first.released
    with book.acquire("k", quota):
        assert book.in_flight("k") == 2
    assert book.in_flight("k") == 1
    second.release()
    assert book.in_flight("k") == 0
    assert book.in_flight("unknown") == 0


def test_rate_limit_message_and_retry_after() -> None:
    clock = FakeClock()
    book = QuotaBook(clock=clock)
    quota = Quota(requests_per_s=5)  # burst 5
    for _ in range(5):
        book.acquire("k", quota).release()
    with pytest.raises(ResourceExhausted) as refused:
        book.acquire("k", quota)
    assert str(refused.value) == "rate limit of 5 requests/s for this API key exceeded; retry in 0.2 s"
    assert refused.value.retry_after_s == pytest.approx(0.2)
    clock.advance(0.2)
    book.acquire("k", quota).release()


def test_rejections_consume_nothing() -> None:
    clock = FakeClock()
    book = QuotaBook(clock=clock)
    quota = Quota(requests_per_s=1, burst=2, max_concurrent=1)
    held = book.acquire("k", quota)  # 1 token left
    for _ in range(10):  # concurrency refusals: no token taken
        with pytest.raises(ResourceExhausted, match="concurrency"):
            book.acquire("k", quota)
    held.release()
    book.acquire("k", quota).release()  # the token the refusals did not take
    for _ in range(10):  # rate refusals: no slot held, no token owed
        with pytest.raises(ResourceExhausted, match="rate limit"):
            book.acquire("k", quota)
    assert book.in_flight("k") == 0
    clock.advance(1.0)
    book.acquire("k", quota).release()


def test_keys_are_limited_independently() -> None:
    book = QuotaBook(clock=FakeClock())
    quota = Quota(requests_per_s=1, burst=1)
    book.acquire("a", quota).release()
    book.acquire("b", quota).release()
    with pytest.raises(ResourceExhausted):
        book.acquire("a", quota)


def test_capture_budget_per_minute() -> None:
    clock = FakeClock()
    book = QuotaBook(clock=clock)
    quota = Quota(capture_bytes_per_min=1000)
    book.charge_capture("k", quota, 700)
    with pytest.raises(ResourceExhausted, match="capture limit of 1000 bytes per minute") as refused:
        book.charge_capture("k", quota, 400)
    assert 59 < refused.value.retry_after_s <= 60
    book.charge_capture("k", quota, 300)  # the refusal recorded nothing
    with pytest.raises(ResourceExhausted) as alone:
        book.charge_capture("k", quota, 1001)
    assert str(alone.value) == "this request alone would capture 1001 bytes, more than the key's 1000 bytes per minute"
    assert alone.value.retry_after_s is None
    clock.advance(60)
    book.charge_capture("k", quota, 1000)


def test_a_changed_quota_takes_effect_and_keeps_in_flight_counts() -> None:
    clock = FakeClock()
    book = QuotaBook(clock=clock)
    slow = Quota(requests_per_s=1, burst=1, max_concurrent=5)
    held = book.acquire("k", slow)
    with pytest.raises(ResourceExhausted, match="rate limit of 1 requests/s"):
        book.acquire("k", slow)
    fast = Quota(requests_per_s=100, burst=100, max_concurrent=1)  # the operator edited the key
    with pytest.raises(ResourceExhausted, match="concurrency limit of 1"):
        book.acquire("k", fast)  # the in-flight request still counts
    held.release()
    tickets = []
    for _ in range(100):
        with book.acquire("k", fast) as ticket:
            tickets.append(ticket)
    assert len(tickets) == 100
    book.charge_capture("k", Quota(capture_bytes_per_min=10), 10)
    book.charge_capture("k", Quota(capture_bytes_per_min=20), 20)  # a new limit starts a new window
    with pytest.raises(ResourceExhausted):
        book.charge_capture("k", Quota(capture_bytes_per_min=20), 1)


def test_book_is_bounded_and_drops_least_recently_used_keys_first() -> None:
    clock = FakeClock()
    book = QuotaBook(max_keys=3, clock=clock)
    quota = Quota(requests_per_s=1, burst=1)
    for key in "abc":
        book.acquire(key, quota).release()
    book.acquire("a", Quota()).release()  # "a" used again: "b" is now the oldest
    book.acquire("d", quota).release()
    assert len(book) == 3
    book.acquire("b", quota).release()  # "b" was dropped: a fresh bucket
    with pytest.raises(ResourceExhausted):
        book.acquire("d", quota)  # "d" was kept: its bucket is empty
    for i in range(10_000):  # a flood of distinct keys
        book.acquire(f"flood-{i}", quota).release()
    assert len(book) == 3


def test_book_never_drops_keys_with_requests_in_flight() -> None:
    book = QuotaBook(max_keys=2, clock=FakeClock())
    quota = Quota(requests_per_s=1, burst=1, max_concurrent=1)
    held = book.acquire("busy", quota)
    for i in range(100):
        book.acquire(f"other-{i}", quota).release()
    assert book.in_flight("busy") == 1
    with pytest.raises(ResourceExhausted, match="concurrency"):
        book.acquire("busy", quota)
    also = book.acquire("busy-too", quota)
    extra = book.acquire("third", quota)  # every kept key busy: the bound yields rather than forget a busy key
    assert len(book) == 3
    for ticket in (held, also, extra):
        ticket.release()
    assert len(book) == 2  # back under the bound once they finish
    with pytest.raises(ResourceExhausted, match="rate limit"):
        book.acquire("third", quota)  # the most recently used stayed, with its state


# ---------------------------------------------------------------------- AdmissionGate


def test_gate_runs_up_to_max_active_and_admits_waiters_in_fifo_order() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_active=2, max_waiting=10)
        release = asyncio.Event()
        order: list[int] = []

        async def request(i: int) -> None:
            async with gate.slot():
                order.append(i)
                await release.wait()

        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(request(i)))
            await asyncio.sleep(0)  # arrive in order
        await asyncio.sleep(0)
        assert (gate.active, gate.waiting) == (2, 4)
        assert order == [0, 1]
        release.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4, 5]
        assert (gate.active, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_gate_refuses_at_once_when_the_queue_is_full() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=2, retry_after_s=0.5)
        release = asyncio.Event()

        async def request() -> None:
            async with gate.slot():
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as refused:
            async with gate.slot():
                pytest.fail("admitted past a full queue")
        assert str(refused.value) == (
            "gateway busy: 1 requests running and 2 waiting (limits 1 running, 2 waiting); retry in 0.5 s"
        )
        assert refused.value.retry_after_s == 0.5
        assert (gate.active, gate.waiting) == (1, 2)
        release.set()
        await asyncio.gather(*tasks)
        assert (gate.active, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_gate_with_no_queue_refuses_when_all_slots_run() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=0)
        async with gate.slot():
            with pytest.raises(ResourceExhausted, match="gateway busy"):
                async with gate.slot():
                    pass
        async with gate.slot():
            assert gate.active == 1

    asyncio.run(main())


def test_gate_waiter_cancelled_while_waiting_leaves_no_trace() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=5)
        release = asyncio.Event()
        admitted: list[str] = []

        async def request(name: str) -> None:
            async with gate.slot():
                admitted.append(name)
                await release.wait()

        running = asyncio.create_task(request("running"))
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(request("cancelled"))
        after = asyncio.create_task(request("after"))
        await asyncio.sleep(0)
        assert gate.waiting == 2
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (gate.active, gate.waiting) == (1, 1)
        release.set()
        await asyncio.gather(running, after)
        assert admitted == ["running", "after"]
        assert (gate.active, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_gate_waiter_cancelled_just_after_being_handed_a_slot_passes_it_on() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=5)
        first = gate.slot()
        await first.__aenter__()
        handed = asyncio.create_task(gate.slot().__aenter__())
        nxt_admitted = asyncio.Event()

        async def nxt() -> None:
            async with gate.slot():
                nxt_admitted.set()

        later = asyncio.create_task(nxt())
        await asyncio.sleep(0)
        assert gate.waiting == 2
        await first.__aexit__(None, None, None)  # hands the slot to `handed` ...
        handed.cancel()  # ... which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await handed
        await asyncio.wait_for(later, 1.0)
        assert nxt_admitted.is_set()
        assert (gate.active, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_gate_releases_the_slot_on_every_exit_path() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_active=1, max_waiting=0)
        with pytest.raises(RuntimeError):
            async with gate.slot():
                raise RuntimeError("boom")
        assert gate.active == 0

        started = asyncio.Event()

        async def long_request() -> None:
            async with gate.slot():
                started.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(long_request())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.active == 0

        async def streaming():  # a servicer's response stream, closed early by its consumer
            async with gate.slot():
                for i in range(10):
                    yield i

        stream = streaming()
        assert await anext(stream) == 0
        assert gate.active == 1
        await stream.aclose()  # GeneratorExit inside the body
        assert gate.active == 0

    asyncio.run(main())


def test_gate_reports_every_change_including_a_call_that_starts_to_wait() -> None:
    """A gauge fed by on_change must show a call sitting in the queue, not only when it enters or leaves."""

    async def main() -> None:
        seen: list[tuple[int, int]] = []
        gate = AdmissionGate(max_active=1, max_waiting=2)
        gate.on_change = lambda: seen.append((gate.active, gate.waiting))
        release = asyncio.Event()

        async def request() -> None:
            async with gate.slot():
                await release.wait()

        running = asyncio.create_task(request())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(request())
        await asyncio.sleep(0)
        assert seen == [(1, 0), (1, 1)]  # the second call is reported while it waits
        cancelled = asyncio.create_task(request())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert seen[-2:] == [(1, 2), (1, 1)]
        release.set()
        await asyncio.gather(running, waiting)
        assert seen[-2:] == [(1, 0), (0, 0)]  # handed to the waiter, then freed

    asyncio.run(main())
