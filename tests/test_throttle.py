"""Adaptive throttling (issue 15.5): "slow down" replies halve the account's rate and
connections for a cool-down, then it climbs back step by step; a named wait is held."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relay.cli.status import account_health, render
from relay.delivery.health import decode
from relay.delivery.throttle import Throttle, named_wait, slow_down_reply
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream


@pytest.mark.parametrize(("code", "enhanced", "text", "slow"), [
    (421, "4.7.0", "Try again later, closing connection.", True),  # Gmail
    (451, "4.7.1", "Rate limit exceeded", True),
    (450, "4.7.0", "Sender rate limited", True),
    (454, None, "Throttling failure: Maximum sending rate exceeded.", True),  # SES
    (451, None, "Too many messages per minute, slow down", True),
    (451, "4.3.0", "Temporary system problem, try again later", False),  # the server's own
    (451, "4.7.1", "Greylisted, please try again later", False),  # this pair, not the rate
    (421, "4.7.0", "Too many messages in this connection", False),  # Exim, per connection
    (454, "4.7.0", "Temporary authentication failure", False),
    (550, "5.7.1", "Rate limit exceeded", False),  # permanent: not a slow-down
    (None, None, "connection refused", False),
    # A quota by name is no slow-down (halving does not help): the account backs off.
    (454, None, "Throttling failure: Daily message quota exceeded.", False),  # SES
    (421, "4.7.28", "Our system has detected an unusual rate; temporarily rate limited",
     True),  # Gmail
    (421, "4.7.0", "Try again in 20 seconds", True),
])
def test_which_replies_mean_slow_down(code: int | None, enhanced: str | None, text: str,
                                      slow: bool) -> None:
    assert slow_down_reply(code, enhanced, text) is slow


def test_a_named_wait_is_read_and_capped() -> None:
    assert named_wait("Rate limit exceeded, try again in 30 seconds") == 30
    assert named_wait("throttled; retry after 2 min") == 120
    assert named_wait("wait 1.5s") == 1.5
    assert named_wait("try again in 9 hours") == 3600
    assert named_wait("try again later") is None


def test_halve_hold_for_the_cool_down_then_add_back_step_by_step() -> None:
    t = Throttle(cooldown_s=60, step_s=30, step=0.25, floor=0.125)
    assert t.slow_down(100.0) and t.factor == 0.5
    assert not t.slow_down(100.5) and t.factor == 0.5  # the same burst: one cut
    assert t.slow_down(103.0) and t.factor == 0.25
    assert t.scale(5) == 1 and t.scale(10) == 2
    assert not t.ease(162.9) and t.factor == 0.25  # still cooling down
    assert t.ease(163.0) and t.factor == 0.5
    assert not t.ease(192.0)
    assert t.ease(223.0) and t.factor == 1.0  # two more steps, capped at full speed
    for now in (300.0, 303.0, 306.0, 309.0):
        t.slow_down(now)
    assert t.factor == 0.125  # never below the floor
    assert not t.slow_down(312.0)  # already at the floor: no change to log


def test_a_named_wait_holds_claims_and_delays_the_increase() -> None:
    t = Throttle(cooldown_s=10, step_s=5)
    t.slow_down(0.0, wait=120.0)
    assert t.held(60.0) == 60.0 and t.held(120.0) == 0.0
    assert not t.ease(119.0) and t.ease(120.0)


async def test_ses_throttling_halves_connections_and_rate_and_is_logged_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 4},
                               rate_limit={"per_minute": 100})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    worker = app.scheduler.workers["up"]
    assert metric(app, "relay_account_throttle_factor", account="up") == 1
    upstream.fail_data(454, "Throttling failure: Maximum sending rate exceeded.", times=2)
    for i in range(3):
        assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    await upstream.wait_for_messages(3)  # the refused ones go later: nothing is lost
    assert worker.throttle.factor == 0.5
    assert metric(app, "relay_account_throttle_factor", account="up") == 0.5
    assert worker._capacity() == 2
    assert worker.limiter.windows[0][1] == 50  # the claim checks the halved limit
    lines = [r.getMessage() for r in caplog.records if "account_throttled" in r.getMessage()]
    assert len(lines) == 1, lines  # one line per change, not one per refused message
    assert "factor=0.5" in lines[0] and "connections=2" in lines[0]
    assert "Throttling failure" in lines[0]
    await app.scheduler.run_until_idle()
    states = {str(m.state) for m in await app.store.list_messages()}
    assert states == {"delivered"}

    async def published() -> float | None:
        report = decode(await app.store.read_health())
        return None if report is None else report.accounts["up"].throttle

    await wait_until_async(published, 0.5)


async def wait_until_async(read: Callable[[], Awaitable[float | None]], want: float) -> None:
    """The health report is written in the background: read it until it says ``want``."""
    for _ in range(100):
        if await read() == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the health report never said {want}")


async def test_a_named_wait_is_honoured_before_the_next_attempt(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    upstream.fail_data(451, "4.7.1 Rate limit exceeded, try again in 1 second", times=1)
    refused_at = time.monotonic()
    assert (await send(app.smtp_port, message("held")))[0] == 250
    await upstream.wait_for_messages(1)
    # retry.initial_delay is 100 ms here: the named second, not the retry delay, decided.
    assert upstream.messages[0].received_at - refused_at >= 0.9


def test_status_shows_a_throttled_account() -> None:
    from relay.cli.status import Snapshot, summarise
    from relay.delivery.health import AccountHealth, HealthReport

    now = time.time()
    report = HealthReport(1, now, {"up": AccountHealth("up", 0.0, 0, throttle=0.25)})
    snap = Snapshot(now=now, queue="q", configured=["up"], counts={}, oldest_by_account={},
                    oldest=None, attempts={}, server_running=True, health=report)
    assert account_health(snap, "up")["throttle_factor"] == 0.25
    assert "ok; slowed to 25% of its rate and connections" in render(summarise(snap))


async def test_a_slow_down_421_throttles_the_account_and_is_not_resent_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A 421 "try again in N seconds" closes the session: resending at once on a fresh
    connection would only add to the rate it complained of (attack round, a2 #4)."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    upstream.reply_to("MAIL", 421, "4.7.0 Try again in 1 second", close=True)
    assert (await send(app.smtp_port, message("held")))[0] == 250
    await upstream.wait_for_messages(1)
    first, second = upstream.times_of("MAIL")[:2]
    assert second - first >= 0.9  # the named second was waited, not a fresh connection
    assert app.scheduler.workers["up"].throttle.factor == 0.5
    await app.scheduler.run_until_idle()
    [queued] = await app.store.list_messages()
    assert str(queued.state) == "delivered" and queued.attempts == 2


async def test_a_named_wait_ended_by_a_flush_is_probed_by_one_send(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """After `relay queue flush` ends "try again in 2 hours", one message tries (as after
    a backoff), not the throttled pool's worth; told again, the account is held again and
    is not reported recovered."""
    upstream.reply_to("MAIL", 451, "4.7.0 Try again in 2 hours", times=100)
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(
        upstream, tmp_path, pool={"max_connections": 4})}))
    for i in range(6):
        assert (await send(app.smtp_port, message(f"m{i}")))[0] == 250
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: worker.throttle.held(worker.mono()) > 0, what="the wait")
    await asyncio.sleep(0.3)
    before = len(upstream.times_of("MAIL"))
    await app.store.request_flush(time.time())  # what `relay queue flush` does...
    worker.resume()  # ...and the server does once it sees it
    await wait_until(lambda: len(upstream.times_of("MAIL")) > before, what="the probe")
    await asyncio.sleep(1.0)
    assert len(upstream.times_of("MAIL")) == before + 1
    assert worker.throttle.held(worker.mono()) > 0 and worker.backoff_failures


async def test_a_wait_named_at_the_greeting_is_the_backoffs_length(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """"421 4.7.0 Try again in 2 hours" at the greeting is account-wide (a backoff step)
    and names a wait: the backoff lasts the wait (an hour at most), so `relay status`
    and a restart see it, not the retry policy's first step (100 ms here)."""
    upstream.greeting(421, "4.7.0 Try again in 2 hours")
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)}))
    assert (await send(app.smtp_port, message("told")))[0] == 250
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: worker.backed_off, what="the backoff")
    assert worker.backoff_until - worker.mono() > 3000


async def test_a_flushed_wait_does_not_come_back_after_a_restart(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """The flush ends the wait in the published health too: a restart (which restores a
    backoff from it) must not hold the account for the rest of the hour."""
    upstream.reply_to("MAIL", 451, "4.7.0 Try again in 2 hours", times=1)
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)})
    app = await start_relay(config)
    _code, text = await send(app.smtp_port, message("told"))
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: worker.throttle.held(worker.mono()) > 0, what="the wait")
    await app.store.delete_messages(states=["deferred"], ids=[text.split()[-1]])
    await app.store.request_flush(time.time())  # `relay queue flush`, nothing to probe with
    worker.resume()
    await asyncio.sleep(0.5)  # the health report is written in the background
    await app.shutdown()
    app = await start_relay(config)
    assert (await send(app.smtp_port, message("after the restart")))[0] == 250
    await upstream.wait_for_messages(1, timeout=5)
