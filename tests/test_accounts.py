"""Account-level failures: quotas and refused logins back the account off as a whole,
one probe and one login at a time; a connection limit lowers the pool instead; claims,
leases and background tasks stay honest; clock jumps neither expire nor stall mail.

Issue 11 points 2, 3, 13, 14, 18 and issue 17 points 2, 4.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from relay.app import App
from relay.bench.sink import PostfixInstance, free_port, postfix_problem
from relay.delivery.health import decode
from relay.delivery.refusals import AUTH, QUOTA, REASONS, SENDER, THROTTLED, account_refusal
from relay.delivery.retry import Defer, Fail, RetryPolicy
from relay.delivery.smtp import upstream as upstream_module
from relay.delivery.smtp.upstream import UpstreamPool, choose_mechanism
from relay.errors import TemporaryFailure
from relay.observe.metrics import BACKOFF_REASONS
from relay.queue.sqlite.store import SQLiteStore
from relay.queue.types import AttemptResult, MessageState, NewMessage, Priority, Recipient
from tests.conftest import (
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    send_many,
    upstream_account,
    wait_until,
)
from tests.upstream import FakeUpstream

QUOTA_REPLY = "5.4.5 Daily user sending quota exceeded. Learn more at https://support.google.com"


# -- the pure parts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "expected"),
    [
        (550, "5.4.5", "Daily user sending quota exceeded.", QUOTA),
        (530, "5.7.0", "Authentication Required.", AUTH),
        (535, "5.7.8", "Username and Password not accepted.", AUTH),
        (550, "5.7.60", "SMTP; Client does not have permissions to send as this sender", SENDER),
        (553, "5.7.1", "Sender address rejected: not owned by user app@example.com", SENDER),
        (554, "5.7.1", "Sender not allowed to send as this account", SENDER),
        (550, None, "You have exceeded your daily sending limit", QUOTA),
        (451, "4.7.0", "Temporary system problem, try again later", THROTTLED),
        (550, "5.7.1", "Your account is suspended", THROTTLED),
        # About this message: fail (5xx) or retry (4xx) it as before.
        (550, "5.1.0", "Sender address rejected: domain not found", None),
        (552, "5.3.4", "Message size exceeds the size limit", None),
        (553, "5.1.7", "The sender address is invalid", None),
        (550, None, "Sender rejected", None),
        (451, "4.3.0", "Local error in processing", None),
    ],
)
def test_account_refusal_table(code: int, enhanced: str | None, text: str,
                               expected: str | None) -> None:
    assert account_refusal(code, enhanced, text) == expected


@given(text=st.text(max_size=200),
       enhanced=st.sampled_from(["5.1.1", "5.1.8", "5.3.4", "5.6.0", "5.1.0"]))
def test_a_message_class_is_never_an_account_refusal(text: str, enhanced: str) -> None:
    """Whatever the text says ("... exceeded the size limit ..."), these concern the message."""
    assert account_refusal(550, enhanced, text) is None
    assert account_refusal(552, None, text) is None


def test_every_reason_is_a_metric_label() -> None:
    assert set(REASONS) <= set(BACKOFF_REASONS)


@pytest.mark.parametrize(
    ("configured", "offered", "expected"),
    [
        ("auto", ["PLAIN", "LOGIN"], "plain"),
        ("auto", ["LOGIN", "CRAM-MD5", "PLAIN"], "cram-md5"),
        ("auto", ["LOGIN"], "login"),
        ("auto", ["XOAUTH2"], None),
        ("login", ["PLAIN", "LOGIN"], "login"),
        ("cram-md5", ["PLAIN", "LOGIN"], None),
    ],
)
def test_one_mechanism_is_chosen(configured: str, offered: list[str],
                                 expected: str | None) -> None:
    assert choose_mechanism(configured, offered) == expected


def test_expiry_counts_age_on_the_given_clock() -> None:
    """A forward jump of the wall clock is taken out of the age (see Scheduler)."""
    policy = RetryPolicy(30.0, 60.0, 3600.0, 0.0)
    rng = random.Random(1)
    error = TemporaryFailure("busy", code=451)
    # The wall clock says 2 days old; the age clock, 100 s.
    decision = policy.decide(error, attempts=1, created_at=0.0, now=172_800.0, rng=rng,
                             age_now=100.0)
    assert isinstance(decision, Defer) and decision.until == 172_830.0
    assert isinstance(policy.decide(error, attempts=1, created_at=0.0, now=172_800.0,
                                    rng=rng), Fail)


# -- 11.2 account-level refusals ------------------------------------------------------


async def test_quota_refusal_defers_and_backs_the_account_off(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Gmail's 550 5.4.5 at MAIL FROM fails nothing; one probe at a time; counted."""
    upstream.fail_mail(550, QUOTA_REPLY)
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 3},
                               retry={"initial_delay": "300ms", "max_delay": "300ms",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    replies = await send_many(app.smtp_port, [message(f"q{i}") for i in range(12)], sessions=3)
    assert all(code == 250 for code, _ in replies)
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="up",
                                    reason="quota") >= 2, what="two quota backoffs")
    assert metric(app, "relay_messages_failed_total", account="up") == 0
    mails = sum(1 for _, verb in upstream.commands if verb == "MAIL")
    # At most one pool's worth before the first refusal, then one probe per backoff.
    backoffs = metric(app, "relay_account_backoffs_total", account="up", reason="quota")
    assert mails <= 3 + backoffs
    # Claims are given back: nothing shows as 'sending' while the account waits (11.13).
    await wait_until(lambda: not app.scheduler.workers["up"].settling, what="writes")
    counts = await app.store.counts()
    assert counts.get(("up", "sending"), 0) <= 1  # at most the probe in flight
    assert counts.get(("up", "failed"), 0) == 0

    upstream.clear_faults()
    await upstream.wait_for_messages(12, timeout=10)
    await app.scheduler.run_until_idle()
    assert metric(app, "relay_messages_delivered_total", account="up") == 12


STOREDRV = ("5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
            " Failed to process message due to a permanent exception")


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "expected"),
    [
        (554, "5.2.0", STOREDRV.removeprefix("5.2.0 "), QUOTA),  # M365, after the dot
        (421, "4.7.0", "Try again later, closing connection.", THROTTLED),  # Gmail
        (421, "4.7.0", "Too many messages in this connection", None),  # Exim
        (452, "4.2.2", "Mailbox full: user is over quota", None),  # one recipient's box
        (451, "4.7.1", "Greylisted, please try again later", None),
        (451, "4.3.0", "Try again later", None),  # the server's trouble: per message
        (452, "4.5.3", "Recipient limit exceeded", QUOTA),  # (refusal() splits it first)
    ],
)
def test_account_refusal_table_at_every_stage(code: int, enhanced: str | None, text: str,
                                              expected: str | None) -> None:
    assert account_refusal(code, enhanced, text) == expected


@pytest.mark.parametrize(
    ("stage", "code", "text"),
    [
        ("rcpt", 550, QUOTA_REPLY),
        ("rcpt", 450, "4.4.5 Daily user sending quota exceeded"),
        ("dot", 550, QUOTA_REPLY),
        ("dot", 554, STOREDRV),
        ("dot", 451, "4.4.5 Daily user sending quota exceeded"),
    ],
)
async def test_quota_at_rcpt_or_after_the_dot_backs_the_account_off(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    stage: str, code: int, text: str,
) -> None:
    """A quota at RCPT or after the final dot is as account-wide as one at MAIL FROM:
    nothing fails (no bounce storm), one probe at a time, all delivered once it lifts."""
    if stage == "rcpt":
        upstream.refuse_rcpt("to@example.com", code, text)
    else:
        upstream.fail_data(code, text, times=10_000)
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 3},
                               retry={"initial_delay": "300ms", "max_delay": "300ms",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    replies = await send_many(app.smtp_port, [message(f"q{i}") for i in range(12)], sessions=3)
    assert all(code == 250 for code, _ in replies)
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="up",
                                    reason="quota") >= 3, what="three quota backoffs")
    assert metric(app, "relay_messages_failed_total", account="up") == 0
    mails = sum(1 for _, verb in upstream.commands if verb == "MAIL")
    backoffs = metric(app, "relay_account_backoffs_total", account="up", reason="quota")
    assert mails <= 3 + backoffs  # one pool's worth, then one probe per backoff

    upstream.clear_faults()
    await upstream.wait_for_messages(12, timeout=10)
    await app.scheduler.run_until_idle()
    assert metric(app, "relay_messages_delivered_total", account="up") == 12
    assert metric(app, "relay_messages_failed_total", account="up") == 0


async def test_a_throttling_421_at_mail_backs_off_a_plain_one_retries_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Gmail's "421 4.7.0 Try again later, closing connection" at MAIL backs the account
    off as throttled (no new connection at once); Exim's plain 421 still goes out at once
    on a fresh connection."""
    upstream.reply_to("MAIL", 421, "4.7.0 Try again later, closing connection.",
                      times=10_000, close=True)
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 3},
                               retry={"initial_delay": "300ms", "max_delay": "300ms",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    await send_many(app.smtp_port, [message(f"t{i}") for i in range(10)], sessions=2)
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="up",
                                    reason="throttled") >= 3, what="three throttle backoffs")
    mails = sum(1 for _, verb in upstream.commands if verb == "MAIL")
    backoffs = metric(app, "relay_account_backoffs_total", account="up", reason="throttled")
    assert mails <= 3 + backoffs
    assert upstream.connections_opened <= 3 + backoffs
    upstream.clear_faults()
    await upstream.wait_for_messages(10, timeout=10)

    # Exim's 421: the same message goes out at once on a new connection, no backoff.
    upstream.reply_to("MAIL", 421, "4.7.0 Too many messages in this connection", close=True)
    before = sum(metric(app, "relay_account_backoffs_total", account="up", reason=r)
                 for r in BACKOFF_REASONS)
    deferred = metric(app, "relay_messages_deferred_total", account="up")
    await send(app.smtp_port, message("exim"))
    await upstream.wait_for_messages(11, timeout=5)
    assert metric(app, "relay_messages_deferred_total", account="up") == deferred
    after = sum(metric(app, "relay_account_backoffs_total", account="up", reason=r)
                for r in BACKOFF_REASONS)
    assert after == before


async def test_an_account_backoff_survives_a_restart(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """Stopped during a quota backoff and started again, relay neither sends a pool's
    worth to the over-quota account nor tries again before the backoff ends (was: 5 MAILs
    at once; for a refused login, one more failed login per restart)."""
    upstream.fail_mail(550, QUOTA_REPLY)
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 5},
                               retry={"initial_delay": "1h", "max_delay": "1h",
                                      "max_age": "2d", "jitter": 0})
    config = relay_config(tmp_path, {"up": account})
    app = await start_relay(config)
    await send_many(app.smtp_port, [message(f"b{i}") for i in range(5)], sessions=5)
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="up",
                                    reason="quota") >= 1, what="a quota backoff")
    # The backoff is in the queue file (as for `relay status`) once published.
    publisher = app.scheduler.health
    await wait_until(lambda: publisher._task is not None and publisher._task.done(),
                     what="the account health to be published")
    await app.shutdown(grace=1)
    mails = len(upstream.times_of("MAIL"))

    app2 = await start_relay(config)
    worker = app2.scheduler.workers["up"]
    assert worker.backoff_failures >= 1 and worker.backoff_until > worker.mono() + 3000
    assert "5.4.5" in worker.last_account_error
    # `relay status` shows it (the report is this process's own again).
    publisher2 = app2.scheduler.health
    await wait_until(lambda: publisher2._task is not None and publisher2._task.done(),
                     what="the restored health to be published")
    report = decode(await app2.store.read_health())
    assert report is not None and report.pid == os.getpid()
    assert report.accounts["up"].failures >= 1 and report.accounts["up"].reason == "quota"
    await send_many(app2.smtp_port, [message(f"n{i}") for i in range(5)], sessions=5)
    await asyncio.sleep(0.5)  # time enough for a burst, had the backoff been lost
    assert len(upstream.times_of("MAIL")) == mails  # nothing sent to the account

    upstream.clear_faults()
    worker.resume()  # what `relay queue flush` does (the older five wait their hour)
    await upstream.wait_for_messages(5, timeout=10)


async def test_a_send_that_never_reached_the_upstream_counts_no_attempt(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A 421 at the greeting (no connection), then a login held back: the messages go
    back with the reason recorded but no attempt counted (was: attempt=1 for the burst)."""
    upstream.greeting(421, "4.3.2 not now")
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 3},
                               retry={"initial_delay": "200ms", "max_delay": "200ms",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    replies = await send_many(app.smtp_port, [message(f"g{i}") for i in range(3)], sessions=3)
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="up",
                                    reason="refused") >= 2, what="two backoffs")
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: not worker.in_flight and not worker.settling, what="writes")
    waiting = [await app.store.get(text.split()[-1]) for _, text in replies]
    assert [m.attempts if m else None for m in waiting] == [0, 0, 0]
    assert any(m and "421 4.3.2 not now" in m.last_error for m in waiting)

    upstream.greeting(None)
    await upstream.wait_for_messages(3, timeout=10)
    await app.scheduler.run_until_idle()
    for _, text in replies:
        stored = await app.store.get(text.split()[-1])
        assert stored is not None and stored.attempts == 1  # the one that delivered it


async def test_a_sender_refusal_still_fails_the_message(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A 5xx to MAIL FROM about this sender is not an account problem."""
    upstream.fail_mail(550, "5.1.0 Sender address rejected: domain not found", times=1)
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    code, _ = await send(app.smtp_port, message("bad sender"))
    assert code == 250
    await wait_until(lambda: metric(app, "relay_messages_failed_total", account="up") == 1,
                     what="the message to fail")
    assert sum(metric(app, "relay_account_backoffs_total", account="up", reason=r)
               for r in BACKOFF_REASONS) == 0


async def test_claims_go_back_when_the_account_backs_off(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """11.13: during a backoff no message shows as 'sending'; hold works on them."""
    upstream.greeting(421, "4.3.2 down for maintenance")
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 3},
                               retry={"initial_delay": "1h", "max_delay": "1h",
                                      "max_age": "2d", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    replies = await send_many(app.smtp_port, [message(f"h{i}") for i in range(10)], sessions=2)
    worker = app.scheduler.workers["up"]
    await wait_until(lambda: worker.backoff_failures >= 1, what="a backoff")
    await wait_until(lambda: not worker.in_flight and not worker.settling, what="writes")
    counts = await app.store.counts()
    assert counts.get(("up", "sending"), 0) == 0
    assert counts.get(("up", "failed"), 0) == 0
    held = await app.store.update_messages(states=["queued", "deferred"], to_state="held",
                                           now=time.time(), ids=[replies[0][1].split()[-1]])
    assert held == 1


# -- 11.3 / 17.4 refused logins -------------------------------------------------------


async def test_wrong_password_costs_one_login_per_backoff(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """20 messages, 5 connections, a wrong password: one failed login, one mechanism."""
    async with FakeUpstream(password="right") as upstream:
        account = upstream_account(upstream, tmp_path, pool={"max_connections": 5},
                                   auth_backoff={"initial": "2s", "max": "4s"})
        account["password_file"] = str(tmp_path / "wrong.secret")
        (tmp_path / "wrong.secret").write_text("wrong")
        (tmp_path / "wrong.secret").chmod(0o600)
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        await send_many(app.smtp_port, [message(f"a{i}") for i in range(20)], sessions=4)
        await wait_until(lambda: upstream.auth_failures >= 1, what="a refused login")
        await asyncio.sleep(1.0)  # well inside the 2 s auth backoff
        assert upstream.auth_failures == 1
        auths = sum(1 for _, verb in upstream.commands if verb == "AUTH")
        assert auths == 1  # one mechanism, not PLAIN then LOGIN
        assert metric(app, "relay_upstream_auth_failures_total", account="up") == 1
        assert metric(app, "relay_account_backoffs_total", account="up", reason="auth") == 1
        assert metric(app, "relay_messages_failed_total", account="up") == 0


@pytest.mark.parametrize(("reply", "close"), [
    ("454 4.7.0 Temporary authentication failure", False),
    ("421 4.7.0 Service not available, closing transmission channel", True),
])
async def test_a_temporary_failure_at_auth_is_not_a_refused_login(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, reply: str, close: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """454/421 to AUTH: the ordinary retry backoff, not the auth floor; no failed login
    counted or logged (only 535 / 5.7.8 are refused logins)."""
    code, text = reply.split(" ", 1)
    upstream.reply_to("AUTH", int(code), text, times=2, close=close)
    account = upstream_account(upstream, tmp_path,
                               retry={"initial_delay": "200ms", "max_delay": "200ms",
                                      "max_age": "1h", "jitter": 0},
                               auth_backoff={"initial": "1h", "max": "1h"})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    assert (await send(app.smtp_port, message("auth")))[0] == 250
    await upstream.wait_for_messages(1, timeout=5)  # not an hour later
    assert metric(app, "relay_upstream_auth_failures_total", account="up") == 0
    assert metric(app, "relay_account_backoffs_total", account="up", reason="auth") == 0
    assert metric(app, "relay_account_backoffs_total", account="up", reason="refused") >= 1
    assert "account_auth_failed" not in caplog.text


async def test_auth_mechanism_is_configurable(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path, auth_mechanism="login")
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    assert (await send(app.smtp_port, message("login")))[0] == 250
    await upstream.wait_for_messages(1)
    assert upstream.auth_successes == 1


async def test_claims_ahead_follow_a_lowered_pool(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """11.13: at most one message claimed ahead per usable connection, also once the
    server has lowered the pool (a high-priority arrival waits behind no more)."""
    upstream.limit_connections(2)
    upstream.delay("DATA", 0.1)
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 5})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    pool, worker = app.transports["up"], app.scheduler.workers["up"]
    assert isinstance(pool, UpstreamPool)
    sending = asyncio.create_task(
        send_many(app.smtp_port, [message(f"r{i}") for i in range(40)], sessions=5))
    await wait_until(lambda: pool.capacity < 5, what="the pool lowered")
    await asyncio.sleep(0.3)  # a few sends finish, and the worker looks again
    assert len(worker.ready) <= pool.capacity
    await sending
    await upstream.wait_for_messages(40, timeout=20)
    await app.scheduler.run_until_idle()


async def test_an_auth_mechanism_the_server_lacks_backs_the_account_off(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    account = upstream_account(upstream, tmp_path, auth_mechanism="cram-md5")
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    _, text = await send(app.smtp_port, message("no cram"))
    await wait_until(lambda: metric(app, "relay_account_backoffs_total", account="up",
                                    reason="auth") == 1, what="an auth backoff")
    assert upstream.auth_failures == 0  # nothing was tried
    row = await app.store.get(text.split()[-1])
    assert row is not None and row.state is not MessageState.FAILED


# -- 17.2 too many connections ---------------------------------------------------------


async def test_connection_limit_lowers_the_pool_without_a_backoff(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """421 at the greeting while other connections work: fewer connections, no backoff."""
    upstream.limit_connections(2)
    account = upstream_account(upstream, tmp_path, pool={"max_connections": 5},
                               retry={"initial_delay": "5s", "max_delay": "5s",
                                      "max_age": "1h", "jitter": 0})
    app = await start_relay(relay_config(tmp_path, {"up": account}))
    pool = app.transports["up"]
    assert isinstance(pool, UpstreamPool)
    await send_many(app.smtp_port, [message(f"c{i}") for i in range(40)], sessions=5)
    await upstream.wait_for_messages(40, timeout=20)
    await app.scheduler.run_until_idle()
    assert upstream.connections_refused >= 1  # the limit was hit
    assert metric(app, "relay_messages_delivered_total", account="up") == 40
    assert metric(app, "relay_messages_deferred_total", account="up") == 0
    assert sum(metric(app, "relay_account_backoffs_total", account="up", reason=r)
               for r in BACKOFF_REASONS) == 0
    assert pool.capacity < 5

    # The limit goes away: the pool tries one more connection at a time, back up to 5.
    upstream.limit_connections(None)
    monkeypatch.setattr(upstream_module, "CAPACITY_PROBE_S", 0.0)
    pool._limit.raise_at = 0.0
    await send_many(app.smtp_port, [message(f"d{i}") for i in range(40)], sessions=5)
    await upstream.wait_for_messages(80, timeout=20)
    await app.scheduler.run_until_idle()
    assert pool.capacity == 5


# -- 11.14 leases and background tasks -------------------------------------------------


async def test_an_expired_lease_is_requeued_without_a_restart(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A row left 'sending' by a task that died goes back to the queue once its lease ends."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    worker = app.scheduler.workers["up"]
    worker.stop_claiming()  # nobody in this process will pick the message up ...
    await worker.join()
    _, text = await send(app.smtp_port, message("orphan"))
    qid = text.split()[-1]
    # ... and a claim whose task is gone: 'sending', lease already over.
    claimed = await app.store.claim_due("up", time.time(), 1, lease_s=0.0)
    assert [m.id for m in claimed] == [qid]
    app.scheduler.workers["up"] = app.scheduler._make_worker(
        "up", app.config, app.transports["up"])
    await app.scheduler._start_worker(app.scheduler.workers["up"], time.time())
    app.scheduler.lease_sweep_s = 0.1
    await upstream.wait_for_messages(1, timeout=10)
    await app.scheduler.run_until_idle()
    row = await app.store.get(qid)
    assert row is not None and row.state is MessageState.DELIVERED


async def test_an_error_in_an_account_worker_is_counted_and_survived(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    worker = app.scheduler.workers["up"]
    real_claim = worker._claim
    calls = {"n": 0}

    async def flaky_claim(*args: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the worker")
        return await real_claim(*args)

    monkeypatch.setattr(worker, "_claim", flaky_claim)
    assert (await send(app.smtp_port, message("survives")))[0] == 250
    await upstream.wait_for_messages(1, timeout=10)
    assert metric(app, "relay_internal_errors_total", component="account_worker") == 1


async def test_an_error_in_a_delivery_task_gives_the_message_back(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug after the send (outside its try) must not leave the row 'sending'."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    worker = app.scheduler.workers["up"]
    real = worker._account_health
    calls = {"n": 0}

    def flaky(*args: Any) -> float | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug after the send")
        return real(*args)

    monkeypatch.setattr(worker, "_account_health", flaky)
    _, text = await send(app.smtp_port, message("given back"))
    await wait_until(lambda: metric(app, "relay_internal_errors_total",
                                    component="delivery") == 1, what="the error counted")
    await wait_until(lambda: upstream.messages.__len__() >= 2, what="a second send")
    await app.scheduler.run_until_idle()
    row = await app.store.get(text.split()[-1])
    assert row is not None and row.state is MessageState.DELIVERED


async def test_an_error_in_the_queue_watcher_is_counted_and_survived(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    real = app.scheduler._reconcile_clock
    rounds = {"n": 0}

    async def flaky() -> None:
        rounds["n"] += 1
        if rounds["n"] == 1:
            raise RuntimeError("a bug in the watcher")
        await real()

    monkeypatch.setattr(app.scheduler, "_reconcile_clock", flaky)
    await wait_until(lambda: rounds["n"] >= 3, what="two more watcher rounds")
    assert metric(app, "relay_internal_errors_total", component="queue_watcher") == 1
    assert app.scheduler._watcher is not None and not app.scheduler._watcher.done()


async def test_a_dead_queue_writer_fails_readyz_and_data_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    writer = app.store._writer
    assert writer is not None and app.store.writer_alive
    writer.cancel()  # the writer task is gone (it survives any exception, not this)
    await asyncio.gather(writer, return_exceptions=True)
    assert not app.store.writer_alive
    async with asyncio.timeout(5):  # at once, not after a client timeout
        code, text = await send(app.smtp_port, message("nowhere"))
    assert code == 451, text
    url = f"http://127.0.0.1:{app.http_port}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 503
        assert "writer" in await resp.text()


async def test_a_queue_writer_that_cannot_run_fails_readyz_and_data_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream,
                                                                           tmp_path)}))
    thread = app.store._write_thread
    assert thread is not None
    thread.shutdown(wait=True)  # the writer's thread is gone: no write can run
    async with asyncio.timeout(5):  # at once, not after a client timeout
        code, text = await send(app.smtp_port, message("nowhere"))
    assert code == 451, text
    url = f"http://127.0.0.1:{app.http_port}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 503
        assert "queue" in await resp.text()
    assert metric(app, "relay_internal_errors_total", component="queue_writer") >= 1
    # A thread again, so that the fixture can close the store.
    app.store._write_thread = ThreadPoolExecutor(1, thread_name_prefix="queue-writer")


# -- 11.18 clock jumps ----------------------------------------------------------------


async def test_a_clock_jump_moves_retry_times_but_not_a_requested_time(
    tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    await store.open()
    try:
        at = 1_000_000.0
        for mid, not_before in (("RETRY", at), ("SCHEDULED", at + 7200)):
            await store.enqueue(NewMessage(
                id=mid, sender="a@example.com", recipients=("b@example.com",),
                account="up", priority=Priority.NORMAL, body=message(mid),
                created_at=at, not_before=not_before))
        claimed = await store.claim_due("up", at, 1, lease_s=60)
        await store.finish(AttemptResult(
            id=claimed[0].id, account="up", state=MessageState.DEFERRED,
            recipients=[Recipient("b@example.com")], attempts=1, next_attempt_at=at + 600,
            last_error="451 busy", at=at, outcome="deferred", reply="451 busy"))
        assert await store.shift_times(-3600.0) == 2
        retry, scheduled = await store.get("RETRY"), await store.get("SCHEDULED")
        assert retry is not None and scheduled is not None
        assert (retry.created_at, retry.next_attempt_at) == (at - 3600, at + 600 - 3600)
        assert (scheduled.created_at, scheduled.next_attempt_at) == (at - 3600, at + 7200)
    finally:
        await store.close()


class JumpingClock:
    """A wall clock that an test can move; monotonic time goes on unaffected."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _use_clock(app: Any, clock: JumpingClock) -> None:
    app.scheduler.clock = clock
    app.scheduler.health._clock = clock
    for worker in app.scheduler.workers.values():
        worker.clock = clock


async def test_a_backward_clock_jump_does_not_stall_a_backed_off_account(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    upstream.greeting(421, "4.3.2 down for maintenance")
    account = upstream_account(upstream, tmp_path,
                               retry={"initial_delay": "300ms", "max_delay": "300ms",
                                      "max_age": "1h", "jitter": 0})
    config = relay_config(tmp_path, {"up": account})
    app = App(config, registry=CollectorRegistry())
    clock = JumpingClock()
    _use_clock(app, clock)
    await app.startup()
    try:
        assert (await send(app.smtp_port, message("jump back")))[0] == 250
        await wait_until(lambda: app.scheduler.workers["up"].backoff_failures >= 1,
                         what="a backoff")
        clock.offset = -3600.0  # the wall clock goes back an hour
        upstream.greeting(None)
        # Due times already stored stay as stored; the backoff itself is monotonic.
        await upstream.wait_for_messages(1, timeout=5)
    finally:
        await app.shutdown(grace=2.0)


async def test_a_forward_clock_jump_does_not_expire_deferred_mail(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    upstream.fail_data(451, "4.3.0 try later", times=2)
    account = upstream_account(upstream, tmp_path,
                               retry={"initial_delay": "200ms", "max_delay": "200ms",
                                      "max_age": "1h", "jitter": 0})
    config = relay_config(tmp_path, {"up": account})
    app = App(config, registry=CollectorRegistry())
    clock = JumpingClock()
    _use_clock(app, clock)
    await app.startup()
    try:
        assert (await send(app.smtp_port, message("jump ahead")))[0] == 250
        await wait_until(lambda: metric(app, "relay_messages_deferred_total",
                                        account="up") >= 1, what="a deferral")
        clock.offset = 2 * 86400.0  # two days ahead: far past max_age
        await upstream.wait_for_messages(1, timeout=5)
        await app.scheduler.run_until_idle()
        assert metric(app, "relay_messages_failed_total", account="up") == 0
        assert metric(app, "relay_messages_delivered_total", account="up") == 1
    finally:
        await app.shutdown(grace=2.0)


# -- 17.2 against a real Postfix --------------------------------------------------------


class LimitedPostfix(PostfixInstance):
    """A private Postfix that holds what it accepts and allows 2 connections per client."""

    def _write_config(self) -> None:
        super()._write_config()
        with (self.root / "etc" / "main.cf").open("a") as main:
            # Loopback is in mynetworks, which the limits exempt by default.
            main.write("smtpd_client_connection_count_limit = 2\n"
                       "smtpd_client_event_limit_exceptions =\n")


@pytest.mark.skipif(postfix_problem() is not None, reason=postfix_problem() or "")
async def test_postfix_connection_count_limit_is_not_an_account_failure(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    root = Path(tempfile.mkdtemp(prefix="relay-postfix-"))  # the postfix user must enter it
    try:
        async with LimitedPostfix(root, sink_port=free_port(), hold=True) as postfix:
            account = {"host": "127.0.0.1", "port": postfix.port, "tls": "none",
                       "pool": {"max_connections": 5},
                       "retry": {"initial_delay": "5s", "max_delay": "5s", "max_age": "1h",
                                 "jitter": 0}}
            app = await start_relay(relay_config(tmp_path, {"pf": account}))
            await send_many(app.smtp_port, [message(f"p{i}") for i in range(20)], sessions=5)
            await wait_until(lambda: metric(app, "relay_messages_delivered_total",
                                            account="pf") == 20, timeout=30,
                             what="20 deliveries to Postfix")
            assert postfix.queued(["hold"]) == 20
            assert metric(app, "relay_messages_deferred_total", account="pf") == 0
            assert sum(metric(app, "relay_account_backoffs_total", account="pf", reason=r)
                       for r in BACKOFF_REASONS) == 0
            pool = app.transports["pf"]
            assert isinstance(pool, UpstreamPool) and pool.capacity <= 2
            assert "Connection concurrency limit exceeded" in (root / "maillog").read_text()
    finally:
        shutil.rmtree(root, ignore_errors=True)
