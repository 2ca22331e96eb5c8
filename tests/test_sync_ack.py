"""ack: after_upstream (issue 16 point 5): relay tries the upstream before it answers DATA,
so a permanent refusal reaches the application at once; everything else is 250 as usual.

Against the real fault-injecting upstream; the message is committed before the attempt.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import WorkerRole
from relay.config.loading import parse_config
from relay.config.report import config_warnings
from relay.delivery.sync import sync_refusal
from relay.delivery.transport import SendResult
from relay.errors import ConfigError, PermanentFailure, StoreError, TemporaryFailure
from relay.queue.types import (
    AttemptResult,
    MessageState,
    NewMessage,
    Priority,
    Recipient,
    RecipientState,
)
from relay.smtp.replies import Reply
from tests.conftest import (
    Launch,
    MakeStore,
    StartRelay,
    message,
    metric,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.relayproc import write_config
from tests.smtpclient import RawSMTP
from tests.upstream import FakeUpstream

SYNC = {"ack": "after_upstream", "sync_timeout": "2s"}


# -- the pure decision ------------------------------------------------------------------


def _result(*states: RecipientState) -> AttemptResult:
    recipients = [Recipient(f"r{i}@example.com", state) for i, state in enumerate(states)]
    final = all(s is not RecipientState.PENDING for s in states)
    delivered = all(s is RecipientState.DELIVERED for s in states)
    state = (MessageState.DELIVERED if delivered else MessageState.FAILED if final
             else MessageState.DEFERRED)
    return AttemptResult(id="m", account="a", state=state, recipients=recipients, attempts=1,
                         next_attempt_at=0.0, last_error="", at=0.0, outcome="x", reply="")


def test_only_a_permanent_refusal_of_everyone_is_passed_on() -> None:
    F, D, P = RecipientState.FAILED, RecipientState.DELIVERED, RecipientState.PENDING
    refused = PermanentFailure("<r0@example.com>: Recipient\r\naddress rejected\x1b[31m",
                               code=550, enhanced="5.1.1")
    assert sync_refusal(refused, _result(F)) == Reply(
        550, "5.1.1", "<r0@example.com>: Recipient address rejected [31m")
    by_rcpt = SendResult(accepted=[], refused={"r0@example.com": PermanentFailure(
        "no such user", code=551, enhanced="5.1.6")})
    assert sync_refusal(by_rcpt, _result(F)) == Reply(551, "5.1.6", "no such user")
    odd = PermanentFailure("x" * 600, code=None, enhanced="4.0.0")
    reply = sync_refusal(odd, _result(F))
    assert reply is not None and (reply.code, reply.enhanced, len(reply.text)) == (
        554, "5.0.0", 400)
    partial = SendResult(accepted=["r0@example.com"], refused={
        "r1@example.com": PermanentFailure("no", code=550, enhanced="5.1.1")})
    assert sync_refusal(partial, _result(D, F)) is None
    assert sync_refusal(SendResult(accepted=["r0@example.com"]), _result(D)) is None
    assert sync_refusal(TemporaryFailure("busy", code=451), _result(P)) is None
    # Failed for its age after a temporary error: not the upstream's answer.
    assert sync_refusal(TemporaryFailure("busy", code=451), _result(F)) is None


def test_ack_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({
        "listen": {"ack": "after_upstream", "sync_timeout": "500ms"},
        "accounts": {"a": {"transport": "maildir", "path": "a"},
                     "b": {"transport": "maildir", "path": "b", "ack": "after_commit"}},
        "routing": {"default_account": "a"}})
    assert (config.ack_for("a"), config.ack_for("b"), config.listen.sync_timeout) == (
        "after_upstream", "after_commit", 0.5)
    assert parse_config({}).ack_for("outbox") == "after_commit"
    with pytest.raises(ConfigError) as caught:
        parse_config({"listen": {"sync_timeout": "5m"}})
    assert caught.value.problems == [
        "listen.sync_timeout: must be more than 0 and at most 1m (clients give up waiting"
        " for the reply to DATA)"]


# -- against the real upstream ----------------------------------------------------------


@pytest.mark.usefixtures("each_store")  # end to end on both stores
async def test_a_550_from_the_upstream_is_the_answer_to_data(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    upstream.refuse_rcpt("nobody@example.com", 550, "5.1.1 <nobody@example.com>: Recipient"
                         " address rejected: User unknown")
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC, bounces={"enabled": True}))
    code, text = await send(app.smtp_port, message("refused"), recipients=["nobody@example.com"])
    assert (code, text) == (550, "5.1.1 <nobody@example.com>: Recipient address rejected:"
                                 " User unknown")
    rows = await app.store.list_messages()
    assert [r.state for r in rows] == [MessageState.FAILED]  # recorded, and no bounce
    assert upstream.messages == []
    assert metric(app, "relay_messages_rejected_total", reason="upstream_refused") == 1
    assert metric(app, "relay_messages_failed_total", account="up") == 1

    # A message that goes through answers 250 once the upstream has it.
    code, text = await send(app.smtp_port, message("fine"))
    assert code == 250 and text.startswith("2.0.0 queued as ")
    assert len(upstream.messages) == 1  # already there: delivered before the answer


@pytest.mark.usefixtures("each_store")
async def test_the_answer_waits_for_the_send_the_worker_loop_claimed_first(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The account's own loop, woken by the commit (PostgreSQL's notice, an outcome just
    recorded), may claim the message in the moment before the session's claim: the
    session still answers with that send's outcome (CI once saw 250 before delivery)."""
    upstream.refuse_rcpt("nobody@example.com", 550, "5.1.1 User unknown")
    upstream.delay("RCPT", 0.3)  # the loop's send is still under way at the session's claim
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC))
    worker = app.scheduler.workers["up"]
    claim_message = app.store.claim_message
    lost = []

    async def loop_first(owner: str, message_id: str, *args: object) -> object:
        # The session's hold on it ends (claim_message's last argument: held_until), as a
        # `relay queue flush` at that moment would end it.
        await app.store.release_hold(message_id, float(args[-1]), time.time())  # type: ignore[arg-type]
        worker.notify()  # the interleaving CI met, made certain: the loop claims first
        await wait_until(lambda: message_id in worker.in_flight, what="the loop's claim")
        claimed = await claim_message(owner, message_id, *args)  # type: ignore[arg-type]
        lost.append(claimed is None)
        return claimed

    monkeypatch.setattr(app.store, "claim_message", loop_first)
    assert await send(app.smtp_port, message("refused"), recipients=["nobody@example.com"]) == (
        550, "5.1.1 User unknown")
    code, _text = await send(app.smtp_port, message("fine"))
    assert code == 250 and len(upstream.messages) == 1  # delivered before the answer
    assert lost == [True, True]  # both were the loop's sends


@pytest.mark.usefixtures("each_store")
@pytest.mark.parametrize("phase", ["recorded", "recording"])
async def test_a_refusal_the_loops_send_wrote_while_the_session_claimed_is_the_answer(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch, phase: str,
) -> None:
    """The loop's send of the message wrote its outcome (or was writing it) while the
    session's own claim committed slowly. That write took the session's waiter, so it
    queued no bounce: the refusal must then be the answer. (It was 250 with neither:
    the sender never learned; found by an attack under load, 54 of 100.)"""
    upstream.refuse_rcpt("nobody@example.com", 550, "5.1.1 User unknown")
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC, bounces={"enabled": True}))
    worker = app.scheduler.workers["up"]
    claim_message = app.store.claim_message

    async def until(condition: Callable[[], bool]) -> None:  # states of a few steps
        for _ in range(1_000_000):
            if condition():
                return
            await asyncio.sleep(0)
        raise AssertionError(f"never reached: {phase}")

    async def slow_commit(owner: str, message_id: str, *args: object) -> object:
        await app.store.release_hold(message_id, float(args[-1]), time.time())  # type: ignore[arg-type]
        worker.notify()  # the loop claims it first and sends it...
        await until(lambda: message_id in worker.in_flight or message_id in worker.recording)
        if phase == "recorded":  # ...and writes the outcome before this commit returns
            await until(lambda: message_id not in worker.in_flight
                        and message_id not in worker.recording)
        else:
            await until(lambda: message_id in worker.recording)
        return await claim_message(owner, message_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(app.store, "claim_message", slow_commit)
    assert await send(app.smtp_port, message("refused"), recipients=["nobody@example.com"]) == (
        550, "5.1.1 User unknown")
    await app.scheduler.run_until_idle()
    assert [r.state for r in await app.store.list_messages()] == [MessageState.FAILED]
    assert upstream.messages == []  # and no bounce: the client has its answer


async def test_a_slow_claim_of_the_loops_does_not_hold_the_answer_past_sync_timeout(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop's claim (which took the message) returns 3 s late (an fsync under load, a
    lock wait): the session waits for it only until sync_timeout, then answers 250."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen={"ack": "after_upstream", "sync_timeout": "1s"}))
    worker = app.scheduler.workers["up"]
    claim_due, claim_message = app.store.claim_due, app.store.claim_message

    async def slow_claim_due(*args: object, **kwargs: object) -> object:
        batch = await claim_due(*args, **kwargs)  # type: ignore[arg-type]
        if batch:
            await asyncio.sleep(3.0)
        return batch

    async def loop_first(owner: str, message_id: str, *args: object) -> object:
        await app.store.release_hold(message_id, float(args[-1]), time.time())  # type: ignore[arg-type]
        worker.notify()
        await wait_until(lambda: bool(worker._claiming), what="the loop's claim")
        await asyncio.sleep(0.2)  # it has taken the row
        return await claim_message(owner, message_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(app.store, "claim_due", slow_claim_due)
    monkeypatch.setattr(app.store, "claim_message", loop_first)
    started = time.monotonic()
    code, _text = await send(app.smtp_port, message("slow claim"))
    assert code == 250 and time.monotonic() - started < 2.5  # not the claim's 3 s
    await upstream.wait_for_messages(1)  # and the loop sends it once its claim returns


@pytest.mark.usefixtures("each_store")
async def test_with_two_workers_the_refusal_is_still_the_answer(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other worker's delivery loop, woken by the commit, must not take the message
    before the session that received it: it is queued held for that session's claim.
    (Before, about 3 in 5 refusals became 250 and a bounce with two workers under load.)"""
    upstream.refuse_rcpt("nobody@example.com", 550, "5.1.1 User unknown")
    config = relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                          listen=SYNC, bounces={"enabled": True})
    a = await start_relay(config, WorkerRole(shared=True, index=0, count=2))
    b = await start_relay(config, WorkerRole(shared=True, index=1, count=2))
    other = b.scheduler.workers["up"]
    claim_message = a.store.claim_message

    async def other_looks_first(*args: object) -> object:
        other.notify()  # the other worker's loop looks for due mail first, as under load
        await asyncio.sleep(0.3)
        return await claim_message(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(a.store, "claim_message", other_looks_first)
    for n in range(3):
        reply = await send(a.smtp_port, message(f"refused {n}"),
                           recipients=["nobody@example.com"])
        assert reply == (550, "5.1.1 User unknown"), n
    assert (await send(a.smtp_port, message("fine")))[0] == 250
    assert len(upstream.messages) == 1  # the fine one, and no bounce


async def test_a_held_message_its_session_could_not_claim_goes_from_the_queue_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session's claim finds no room (another process's sends filled the window at
    that moment): 250, and the message is due now, not after its hold (sync_timeout)."""
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen={"ack": "after_upstream",
                                                 "sync_timeout": "30s"}))

    async def no_room(*args: object) -> None:
        return None

    monkeypatch.setattr(app.store, "claim_message", no_room)
    started = time.monotonic()
    assert (await send(app.smtp_port, message("no room")))[0] == 250
    await upstream.wait_for_messages(1, timeout=10)  # from the queue, by the loop
    assert time.monotonic() - started < 10  # not the 30 s hold


async def test_no_immediate_attempt_while_a_wait_the_server_named_holds(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """"Try again in 2 hours" holds the account: a new message is answered 250 and waits
    in the queue; the session sends nothing (it sent each one, told to wait again)."""
    upstream.reply_to("MAIL", 451, "4.7.0 Try again in 2 hours", times=100)
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC))
    worker = app.scheduler.workers["up"]
    assert (await send(app.smtp_port, message("told")))[0] == 250
    await wait_until(lambda: worker.throttle.held(worker.mono()) > 0, what="the wait")
    for n in range(4):
        assert (await send(app.smtp_port, message(f"held {n}")))[0] == 250
    await asyncio.sleep(0.3)
    assert len(upstream.times_of("MAIL")) == 1


async def test_a_queue_error_at_the_sessions_claim_ends_the_hold_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen={"ack": "after_upstream",
                                                 "sync_timeout": "30s"}))

    async def broken(*args: object) -> None:
        raise StoreError("database is locked")

    monkeypatch.setattr(app.store, "claim_message", broken)
    assert (await send(app.smtp_port, message("claim failed")))[0] == 250
    await upstream.wait_for_messages(1, timeout=10)  # from the queue, not after 30 s


async def test_a_refusal_after_the_dot_is_passed_on_too(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    upstream.fail_data(554, "5.7.1 Message rejected as spam")
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC))
    assert await send(app.smtp_port, message("spam")) == (554, "5.7.1 Message rejected as spam")


@pytest.mark.parametrize("fault", ["451 after the dot", "421 to MAIL and hang up"])
async def test_a_temporary_failure_answers_250_and_delivers_once_later(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, fault: str,
) -> None:
    if fault.startswith("451"):
        upstream.fail_data(451, "4.3.0 try again later")
    else:
        upstream.reply_to("MAIL", 421, "4.7.0 upstream.test closing connection", times=2,
                          close=True)
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC))
    code, _ = await send(app.smtp_port, message("later"))
    assert code == 250
    await upstream.wait_for_messages(1)  # the retry (100 ms in tests)
    await wait_until(lambda: metric(app, "relay_messages_delivered_total", account="up") == 1)
    assert len(upstream.messages) == 1
    assert [r.state for r in await app.store.list_messages()] == [MessageState.DELIVERED]


async def test_a_slow_upstream_answers_250_at_sync_timeout_and_is_not_sent_twice(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    upstream.delay("DATA", 1.0)  # recorded at once, the 250 comes a second later
    app = await start_relay(relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path)},
        listen={"ack": "after_upstream", "sync_timeout": "200ms"}, bounces={"enabled": True}))
    code, _ = await send(app.smtp_port, message("slow"))
    assert code == 250
    assert [r.state for r in await app.store.list_messages()] == [MessageState.SENDING]
    await wait_until(lambda: metric(app, "relay_messages_delivered_total", account="up") == 1)
    assert len(upstream.messages) == 1


async def test_the_rate_limit_holds_for_immediate_attempts(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    app = await start_relay(relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path, rate_limit={"per_minute": 1})},
        listen=SYNC))
    assert (await send(app.smtp_port, message("first")))[0] == 250
    assert len(upstream.messages) == 1
    upstream.refuse_rcpt("to@example.com", 550, "5.1.1 unknown")
    assert (await send(app.smtp_port, message("second")))[0] == 250  # no room: queued
    rows = {r.state for r in await app.store.list_messages()}
    assert rows == {MessageState.DELIVERED, MessageState.QUEUED}
    assert len(upstream.messages) == 1


async def test_an_account_can_ask_for_it_alone(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    upstream.fail_message_attempts(b"refuse-me", 550, "5.6.0 malformed message", times=2)
    app = await start_relay(relay_config(tmp_path, {
        "up": upstream_account(upstream, tmp_path),
        "sync": upstream_account(upstream, tmp_path, ack="after_upstream")}))
    assert (await send(app.smtp_port, message("a", body="refuse-me\r\n")))[0] == 250
    refused = await send(app.smtp_port, message("b", headers={"X-Account": "sync"},
                                                body="refuse-me\r\n"))
    assert refused == (550, "5.6.0 malformed message")


async def test_claim_message_takes_only_that_message_and_only_once(make_store: MakeStore
                                                                  ) -> None:
    """Two workers' stores on one queue (both stores): the one that received it claims
    it; the other cannot; a full rate window or a paused account claims nothing."""
    first, second = make_store(lock=False), make_store(lock=False)
    await first.open()
    await second.open()
    try:
        now = time.time()
        for n in ("m1", "m2"):
            await first.enqueue(NewMessage(id=n, sender="a@example.com",
                                           recipients=("b@example.com",), account="up",
                                           priority=Priority.NORMAL, body=b"x\r\n",
                                           created_at=now, not_before=now))
        claimed = await first.claim_message("up", "m1", now, 60)
        assert claimed is not None and claimed.id == "m1" and claimed.claim is not None
        assert await second.claim_message("up", "m1", now, 60) is None
        assert await second.claim_message("other", "m2", now, 60) is None  # not its account
        # m1 is in flight: a window of 1 per minute has no room for m2.
        assert await second.claim_message("up", "m2", now, 60, [(60.0, 1)]) is None
        await second.set_paused("up", True, now)
        assert await second.claim_message("up", "m2", now, 60) is None
        await second.set_paused("up", False, now)
        assert (await second.claim_message("up", "m2", now, 60)) is not None
    finally:
        await first.close()
        await second.close()


async def test_killed_between_commit_and_attempt_delivers_after_restart(
    tmp_path: Path, upstream: FakeUpstream, launch: Launch,
) -> None:
    upstream.delay("GREETING", 30)  # the attempt hangs before the upstream greets
    config = write_config(tmp_path, upstream, ack="after_upstream")
    relay = await launch(config)
    await relay.wait_started()

    async def submit() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False)
        async with client:
            await client.sendmail("app@example.com", ["to@example.com"], message("k"))

    session = asyncio.create_task(submit())
    await wait_until(lambda: upstream.connections_opened >= 1, what="the attempt")
    relay.proc.send_signal(signal.SIGKILL)
    assert await relay.exit_code(within=5) == -signal.SIGKILL
    with pytest.raises(aiosmtplib.SMTPException):
        await session  # the client got no answer: it would retry; relay has it anyway
    upstream.delay("GREETING", 0)
    restarted = await launch(config)
    await restarted.wait_started()
    await upstream.wait_for_messages(1, timeout=15)
    restarted.proc.send_signal(signal.SIGTERM)
    assert await restarted.exit_code(within=10) == 0
    assert len(upstream.messages) == 1 and b"Subject: k" in upstream.messages[0].data


# -- fixes from the attack round (issues 15, 16) ------------------------------------------


def _queued_id(reply: tuple[int, str]) -> str:
    code, text = reply
    assert code == 250 and text.startswith("2.0.0 queued as "), reply
    return text.removeprefix("2.0.0 queued as ")


@pytest.mark.usefixtures("each_store")  # the key is forgotten in each store's finish
async def test_a_retry_of_a_refused_message_is_tried_again_not_deduplicated(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """The client was told 550: nothing was accepted, so dedup does not answer its retry
    with the failed message's id; the retry is queued and tried (the typo was fixed
    upstream meanwhile, say)."""
    upstream.fail_data(550, "5.1.1 no such user", times=1)
    app = await start_relay(relay_config(tmp_path, {"up": upstream_account(upstream, tmp_path)},
                                         listen=SYNC, dedup={"window": "1h"}))
    body = message("order", headers={"Message-ID": "<order-77@shop.example>"})
    assert await send(app.smtp_port, body) == (550, "5.1.1 no such user")
    [failed] = await app.store.list_messages()
    retry = _queued_id(await send(app.smtp_port, body))
    assert retry != failed.id
    assert len(upstream.messages) == 1  # the retry was sent before its 250
    assert metric(app, "relay_messages_deduplicated_total") == 0
    # A further copy is a duplicate of the accepted retry, as any other.
    assert _queued_id(await send(app.smtp_port, body)) == retry


async def test_the_immediate_attempt_keeps_the_share_reserved_for_high_priority(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """reserve_for_high 50% of 4 a minute: normal mail may use 2; the third waits in the
    queue (250 without an attempt), and a high-priority message may still go at once."""
    app = await start_relay(relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path, rate_limit={
            "per_minute": 4, "reserve_for_high": "50%"})},
        listen=SYNC))
    for n in range(3):
        assert (await send(app.smtp_port, message(f"normal {n}")))[0] == 250
    assert len(upstream.messages) == 2
    assert (await send(app.smtp_port, message("urgent", headers={"X-Priority": "1"})))[0] == 250
    # At once: by the session's own attempt, or by the account's worker when its claim
    # (which takes high priority first) was under way at that moment (a race a loaded
    # machine shows): either way within the window the normal mail filled.
    await upstream.wait_for_messages(3, timeout=5)
    assert b"Subject: urgent" in upstream.messages[2].data
    # The worker's send may be still recording its outcome ('sending') for a moment.
    for _ in range(100):
        states = sorted(str(r.state) for r in await app.store.list_messages())
        if "sending" not in states:
            break
        await asyncio.sleep(0.05)
    assert states == ["delivered", "delivered", "delivered", "queued"]


async def test_a_client_that_leaves_before_the_answer_gets_a_bounce_for_the_refusal(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """Nobody is left to hear the 550: the session counts as answered 250 and the refusal
    bounces to the sender, as with ack: after_commit."""
    upstream.delay("DATA", 2.0)  # the client leaves well before the 550
    upstream.fail_data(550, "5.1.1 no such user", times=1)
    app = await start_relay(relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path)},
        listen={"ack": "after_upstream", "sync_timeout": "20s"}, bounces={"enabled": True}))
    client = await RawSMTP.connect(app.smtp_port)
    await client.reply()
    for line in ("EHLO client.example", "MAIL FROM:<app@example.com>",
                 "RCPT TO:<nobody@example.org>", "DATA"):
        await client.cmd(line)
    await client.send_raw(message("gone") + b".\r\n")
    await wait_until(lambda: upstream.connections_opened >= 1, what="the attempt")
    await client.close()
    # The bounce is sent from <> to the sender through the account (well before the
    # 20 s sync_timeout would have ended the wait).
    await upstream.wait_for_messages(1, timeout=10)
    [bounce] = upstream.messages
    assert (bounce.mail_from, list(bounce.rcpt_tos)) == ("<>", ["app@example.com"])
    assert metric(app, "relay_messages_rejected_total", reason="upstream_refused") == 0


async def test_shutdown_answers_waiting_sessions_250_at_once(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """The message is committed: a session waiting for the upstream is answered 250 when
    shutdown begins, not after sync_timeout (the send itself gets the grace as usual)."""
    upstream.delay("DATA", 30)
    app = await start_relay(relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path)},
        listen={"ack": "after_upstream", "sync_timeout": "30s"}))
    session = asyncio.create_task(send(app.smtp_port, message("late")))
    await wait_until(lambda: upstream.connections_opened >= 1, what="the attempt")
    stopping = asyncio.create_task(app.shutdown(grace=1.0))
    try:
        code, _ = await asyncio.wait_for(session, 10)  # not the 30 s sync_timeout
    finally:
        await stopping
    assert code == 250


async def test_a_groups_mail_is_answered_per_the_groups_ack_not_a_members(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """A group's message is answered before a member is chosen: a member's own `ack` is
    for mail routed to it by name (check-config says so); the group has its own."""
    upstream.fail_message_attempts(b"refuse-me", 550, "5.6.0 malformed message", times=5)
    config = relay_config(
        tmp_path, {"up": upstream_account(upstream, tmp_path, ack="after_upstream")},
        routing={"groups": {"plain": {"accounts": ["up"]},
                            "sync": {"accounts": ["up"], "ack": "after_upstream"}}})
    assert (config.ack_for("plain"), config.ack_for("sync")) == ("after_commit",
                                                                 "after_upstream")
    assert config_warnings(config) == [
        "accounts.up.ack: after_upstream applies to mail routed to up itself; mail for group"
        " plain is answered after_commit (set routing.groups.plain.ack)"]
    app = await start_relay(config)
    refused = (550, "5.6.0 malformed message")
    assert await send(app.smtp_port, message("a", headers={"X-Account": "sync"},
                                             body="refuse-me\r\n")) == refused
    assert (await send(app.smtp_port, message("b", headers={"X-Account": "plain"},
                                              body="refuse-me\r\n")))[0] == 250


def test_queue_show_names_the_hold_of_a_message_waiting_for_its_session() -> None:
    """A message held for its session's claim is not the client's Deferred-Delivery."""
    from relay.delivery.waiting import why_waiting

    now = 1000.0
    held = why_waiting(MessageState.QUEUED, 0, now, now + 2.0, now, sync_hold_s=2.0)
    assert [(r.kind, r.until) for r in held] == [("sync-hold", now + 2.0)]
    later = why_waiting(MessageState.QUEUED, 0, now, now + 3600.0, now, sync_hold_s=2.0)
    assert [r.kind for r in later] == ["deferred-delivery"]
    assert [r.kind for r in why_waiting(MessageState.QUEUED, 0, now, now + 2.0, now)] == [
        "deferred-delivery"]  # an account answered after_commit: no hold
