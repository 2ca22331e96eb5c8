"""Priority under limits (issue 15.4): rate_limit.reserve_for_high keeps a share of every
window for high-priority mail, in the claim (across workers) and in the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from relay.config.loading import load_config
from relay.delivery.ratelimit import RateLimiter, share_for_others
from relay.queue.types import Priority
from tests.conftest import (
    MakeStore,
    StartRelay,
    TwoWorkers,
    message,
    new_message,
    relay_config,
    send_many,
    upstream_account,
)
from tests.test_queue_cli import Relay, write_config
from tests.upstream import FakeUpstream


def test_the_share_for_others_rounds_down_but_never_to_zero() -> None:
    assert share_for_others(10, 0.1) == 9
    assert share_for_others(10, 0.2) == 8
    assert share_for_others(3, 0.1) == 2
    assert share_for_others(1, 0.5) == 1  # a window of one cannot be shared
    assert share_for_others(2000, 0.0) == 2000


def test_the_limiter_holds_others_at_their_share_and_lets_high_use_the_rest() -> None:
    limiter = RateLimiter([(60.0, 10)], reserve_for_high=0.2)
    for i in range(8):
        limiter.record(float(i))
    assert limiter.available(10.0, others=True) == 0
    assert limiter.wait_time(10.0, others=True) > 0
    assert limiter.available(10.0) == 2 and limiter.wait_time(10.0) == 0


async def test_two_workers_claims_keep_the_reserve(two_workers: TwoWorkers) -> None:
    """In the claim's transaction (both stores): what two workers claim of low priority
    together stays within the share; a high message claimed after them still finds room."""
    a, b = two_workers
    now = time.time()
    for _ in range(20):
        await a.enqueue(new_message(now, priority=Priority.LOW))
    per_minute = ((60.0, 10),)
    first = await a.claim_due("up", now, 6, lease_s=30, windows=per_minute,
                              reserve_for_high=0.2)
    second = await b.claim_due("up", now, 6, lease_s=30, windows=per_minute,
                               reserve_for_high=0.2)
    assert (len(first), len(second)) == (6, 2)
    assert await a.claim_due("up", now, 6, lease_s=30, windows=per_minute,
                             reserve_for_high=0.2) == []
    urgent = new_message(now + 1, priority=Priority.HIGH)
    await b.enqueue(dataclasses.replace(urgent, not_before=now))
    claimed = await b.claim_due("up", now + 1, 6, lease_s=30, windows=per_minute,
                                reserve_for_high=0.2)
    assert [m.id for m in claimed] == [urgent.id]  # high first, and only high fits


async def test_claiming_one_message_by_id_keeps_the_reserve_too(make_store: MakeStore
                                                                ) -> None:
    """claim_message (ack: after_upstream) on claim_due's terms: once the others' share
    of the window is taken, a normal message waits and a high one is still claimed."""
    store = make_store()
    await store.open()
    try:
        now = time.time()
        per_minute = ((60.0, 10),)
        for _ in range(8):
            await store.enqueue(new_message(now, priority=Priority.LOW))
        assert len(await store.claim_due("up", now, 10, lease_s=30, windows=per_minute,
                                         reserve_for_high=0.2)) == 8
        normal = new_message(now, priority=Priority.NORMAL)
        high = new_message(now, priority=Priority.HIGH)
        await store.enqueue(normal)
        await store.enqueue(high)
        assert await store.claim_message("up", normal.id, now, 30, per_minute, 0.2) is None
        claimed = await store.claim_message("up", high.id, now, 30, per_minute, 0.2)
        assert claimed is not None and claimed.id == high.id and claimed.claim is not None
        assert await store.claim_message("up", normal.id, now, 30, per_minute) is not None
    finally:
        await store.close()


async def test_a_late_high_message_goes_within_the_window_despite_a_low_backlog(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path,
                               rate_limit={"per_minute": 10, "reserve_for_high": "20%"})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    lows = [message(f"low {i}", headers={"X-Priority": "5"}) for i in range(15)]
    assert all(code == 250 for code, _ in await send_many(app.smtp_port, lows, sessions=3))
    await upstream.wait_for_messages(8)
    await asyncio.sleep(0.5)
    assert len(upstream.messages) == 8  # the low backlog stops at its share of the minute
    started = time.monotonic()
    code, _ = (await send_many(app.smtp_port, [message("password reset",
                                                       headers={"X-Priority": "1"})]))[0]
    assert code == 250
    await upstream.wait_for_messages(9, timeout=20)
    assert b"password reset" in upstream.messages[8].data
    assert time.monotonic() - started < 20  # within the minute, not after it


async def test_the_views_say_the_reserve_holds_normal_mail(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """a3 #6: with the normal share used, `accounts quota`, `status` and `queue show` must
    not say "now" for normal mail: the reserve holds it until its share has room."""
    account = upstream_account(upstream, tmp_path,
                               rate_limit={"per_minute": 10, "reserve_for_high": "20%"})
    path = write_config(tmp_path, {"up": account})
    app = await start_relay(load_config(path))
    lows = [message(f"low {i}", headers={"X-Priority": "5"}) for i in range(10)]
    assert all(code == 250 for code, _ in await send_many(app.smtp_port, lows, sessions=2))
    await upstream.wait_for_messages(8)
    await asyncio.sleep(0.3)
    relay = Relay(path, capsys)
    quota = await relay("accounts", "quota")
    [total, normal] = [line for line in quota.out.splitlines() if "left of" in line]
    assert "2 left of 10" in total and total.endswith("next slot: now")
    assert "0 left of 8" in normal and "reserved for high" in normal
    assert not normal.endswith("next slot: now")
    status = await relay("status")
    [line] = [x for x in status.out.splitlines() if "next send:" in x]
    assert "next send: now (high priority); normal and low: 20" in line, line
    waiting = [m for m in await app.store.list_messages() if str(m.state) == "queued"]
    assert waiting
    shown = await relay("queue", "show", waiting[0].id)
    assert "due now" not in shown.out
    assert "reserved for high priority" in shown.out, shown.out


def test_a_reserve_without_a_window_and_an_absurd_weight_are_refused_naming_the_key() -> None:
    from relay.config.loading import parse_config
    from relay.errors import ConfigError

    account = {"transport": "maildir", "path": "/tmp/a"}
    with pytest.raises(ConfigError, match=r"accounts\.a\.rate_limit\.reserve_for_high: keeps a"
                                          r" share of each rate-limit window, but none is set"):
        parse_config({"accounts": {"a": {**account, "rate_limit": {"reserve_for_high": "10%"}}},
                      "routing": {"default_account": "a"}})
    with pytest.raises(ConfigError, match=r"routing\.groups\.g\.weights\.b"):
        parse_config({"accounts": {"a": account, "b": account},
                      "routing": {"default_account": "g", "groups": {"g": {
                          "accounts": ["a", "b"], "mode": "weighted",
                          "weights": {"a": 1, "b": 10**30}}}}})
