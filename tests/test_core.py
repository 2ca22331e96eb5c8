"""The pure core, without I/O: rate limits, retry policy, priority, headers, routing, outcome."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery.outcome import settle
from relay.delivery.priority import priority_from_headers
from relay.delivery.ratelimit import SAFETY_MARGIN_S, UNTIL_A_SEND_ENDS, RateLimiter
from relay.delivery.retry import Defer, Fail, RetryPolicy
from relay.delivery.routing import RoutingError, choose_account, deferred_until
from relay.delivery.transport import SendResult
from relay.errors import PermanentFailure, TemporaryFailure
from relay.queue.types import (
    TRANSITIONS,
    MessageState,
    Priority,
    QueuedMessage,
    Recipient,
    RecipientState,
)
from relay.smtp.headers import parse_headers, remove_headers

# -- rate limits


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(
        st.tuples(st.sampled_from([1.0, 2.0, 5.0, 60.0]), st.integers(1, 6)), min_size=1,
        max_size=3,
    ),
    gaps=st.lists(st.floats(0, 3), min_size=1, max_size=60),
)
def test_rate_limiter_never_exceeds_any_window(
    limits: list[tuple[float, int]], gaps: list[float]
) -> None:
    """Sending whenever wait_time() says 0 never puts more than N sends in any window."""
    limiter = RateLimiter(limits)
    now, sent = 0.0, []
    for gap in gaps:
        now += gap
        wait = limiter.wait_time(now)
        if wait > 0:
            now += wait
            assert limiter.wait_time(now) == 0
        limiter.record(now)
        sent.append(now)
    for window, limit in limits:
        for i, start in enumerate(sent):
            inside = [t for t in sent[i:] if t < start + window - 1e-6]  # limiter tolerance
            assert len(inside) <= limit


def test_rate_limiter_restore_holds_across_restart() -> None:
    limiter = RateLimiter([(3600.0, 2)])
    limiter.restore([100.0, 200.0, 50_000.0], now=1000.0)  # a future time is ignored
    expected = 100.0 + 3600.0 + SAFETY_MARGIN_S - 1000.0
    assert limiter.wait_time(1000.0) == pytest.approx(expected)
    assert limiter.available(1000.0) == 0
    assert RateLimiter([]).wait_time(5.0) == 0 and not RateLimiter([]).limited
    assert RateLimiter([(1.0, 10)]).window_capacity() == 10
    assert RateLimiter([(60.0, 100), (86400.0, 2000)]).window_capacity() == 2000
    assert RateLimiter([(1.0, 1), (60.0, 100)]).window_capacity() == 60


# -- retry


def test_retry_doubles_to_the_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_delay=30, max_delay=1800, max_age=172_800, jitter=0.2)
    rng = random.Random(1)
    for attempts, base in [(1, 30), (2, 60), (3, 120), (7, 1800), (100, 1800), (5000, 1800)]:
        delay = policy.next_delay(attempts, rng)
        assert base * 0.8 <= delay <= base * 1.2


def test_retry_decisions() -> None:
    policy = RetryPolicy(initial_delay=10, max_delay=100, max_age=1000, jitter=0)
    rng = random.Random(0)
    temp = TemporaryFailure("busy", code=451, enhanced="4.3.0")
    perm = PermanentFailure("no such user", code=550, enhanced="5.1.1")
    assert policy.decide(temp, attempts=1, created_at=0, now=5, rng=rng) == Defer(
        15, "451 4.3.0 busy"
    )
    assert isinstance(policy.decide(perm, attempts=1, created_at=0, now=5, rng=rng), Fail)
    # Near the deadline: one last try exactly at max_age, then expiry.
    last = policy.decide(temp, attempts=9, created_at=0, now=950, rng=rng)
    assert last == Defer(1000, "451 4.3.0 busy")
    expired = policy.decide(temp, attempts=10, created_at=0, now=1000, rng=rng)
    assert isinstance(expired, Fail) and "expired" in expired.reason


# -- priority and headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], Priority.NORMAL),
        ([("X-Priority", "1 (Highest)")], Priority.HIGH),
        ([("X-Priority", "2")], Priority.HIGH),
        ([("X-Priority", "3")], Priority.NORMAL),
        ([("X-Priority", "5 (Lowest)")], Priority.LOW),
        ([("X-Priority", "9")], Priority.NORMAL),
        ([("Priority", "urgent")], Priority.HIGH),
        ([("Priority", "non-urgent")], Priority.LOW),
        ([("Importance", "High")], Priority.HIGH),
        ([("Importance", "low")], Priority.LOW),
        # X-Priority wins over Priority, which wins over Importance.
        ([("Importance", "high"), ("X-Priority", "5")], Priority.LOW),
        ([("Importance", "low"), ("Priority", "urgent")], Priority.HIGH),
    ],
)
def test_priority_from_headers(headers: list[tuple[str, str]], expected: Priority) -> None:
    assert priority_from_headers(headers) == expected


def test_remove_headers_keeps_every_other_byte() -> None:
    body = (b"From: a@x\r\nX-Account: gmail\r\n  folded-on\r\nSubject: s\r\n"
            b"X-Account-Note: kept\r\n\r\nX-Account: in body stays\r\n.\r\n")
    out = remove_headers(body, {"X-Account"})
    assert out == (b"From: a@x\r\nSubject: s\r\nX-Account-Note: kept\r\n\r\n"
                   b"X-Account: in body stays\r\n.\r\n")
    assert remove_headers(b"X-Account: a\r\n\r\nbody", {"x-account"}) == b"\r\nbody"
    assert remove_headers(b"no headers at all", {"x-account"}) == b"no headers at all"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_header_functions_never_crash_and_only_remove(body: bytes) -> None:
    fields = parse_headers(body)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields)
    out = remove_headers(body, {"X-Account", "Deferred-Delivery"})
    assert len(out) <= len(body)
    assert body.endswith(out[len(out) - min(len(out), 0):])
    priority_from_headers(fields)


def test_routing_and_deferred_delivery() -> None:
    accounts = ["gmail", "ses"]
    assert choose_account([], "gmail", accounts) == "gmail"
    assert choose_account([("x-account", " ses ")], "gmail", accounts) == "ses"
    with pytest.raises(RoutingError, match="X-Account"):
        choose_account([("X-Account", "nope")], "gmail", accounts)
    when = deferred_until([("Deferred-Delivery", "Tue, 01 Dec 2026 10:00:00 +0000")])
    assert when == 1796119200.0
    assert deferred_until([]) is None
    with pytest.raises(RoutingError, match="Deferred-Delivery"):
        deferred_until([("Deferred-Delivery", "next tuesday")])


# -- outcome


def _queued(*addresses: str, attempts: int = 0) -> QueuedMessage:
    return QueuedMessage(
        id="Q1", state=MessageState.SENDING, account="a", priority=Priority.NORMAL,
        sender="s@x", recipients=[Recipient(a) for a in addresses], size=10,
        attempts=attempts, created_at=0.0, next_attempt_at=0.0,
    )


POLICY = RetryPolicy(initial_delay=10, max_delay=100, max_age=1000, jitter=0)


def test_settle_partial_recipients() -> None:
    sent = SendResult(
        accepted=["ok@x"],
        refused={
            "gone@x": PermanentFailure("no such user", code=550, enhanced="5.1.1"),
            "later@x": TemporaryFailure("mailbox busy", code=451, enhanced="4.2.1"),
        },
        reply="250 2.0.0 ok",
    )
    result = settle(_queued("ok@x", "gone@x", "later@x"), sent, now=5, policy=POLICY,
                    rng=random.Random(0))
    states = {r.address: r.state for r in result.recipients}
    assert states == {"ok@x": RecipientState.DELIVERED, "gone@x": RecipientState.FAILED,
                      "later@x": RecipientState.PENDING}
    assert result.state is MessageState.DEFERRED and result.outcome == "partial"
    assert result.next_attempt_at == 15 and "451 4.2.1 mailbox busy" in result.last_error


def test_settle_whole_message_outcomes() -> None:
    rng = random.Random(0)
    ok = settle(_queued("a@x"), SendResult(accepted=["a@x"], reply="250 ok"), now=1,
                policy=POLICY, rng=rng)
    assert ok.state is MessageState.DELIVERED and ok.attempts == 1
    perm = settle(_queued("a@x"), PermanentFailure("rejected", code=554, enhanced="5.7.1"),
                  now=1, policy=POLICY, rng=rng)
    assert perm.state is MessageState.FAILED and "554 5.7.1 rejected" in perm.last_error
    down = TemporaryFailure("connection refused", account_wide=True)
    held = settle(_queued("a@x"), down, now=1, policy=POLICY, rng=rng, resume_at=40)
    assert held.state is MessageState.DEFERRED and held.next_attempt_at == 40
    expired = settle(_queued("a@x", attempts=20), TemporaryFailure("busy", code=451),
                     now=2000, policy=POLICY, rng=rng)
    assert expired.state is MessageState.FAILED and "expired" in expired.last_error


def test_state_transitions_table() -> None:
    assert MessageState.SENDING in TRANSITIONS[MessageState.QUEUED]
    assert MessageState.DEFERRED in TRANSITIONS[MessageState.SENDING]
    assert MessageState.QUEUED not in TRANSITIONS[MessageState.DELIVERED]
    assert MessageState.SENDING not in TRANSITIONS[MessageState.HELD]


# -- bounces (issue 11.6)


@settings(max_examples=200, deadline=None)
@given(address=st.text(min_size=1, max_size=40), reply=st.text(max_size=300))
def test_dsn_never_gains_a_header_from_an_address_or_a_reply(address: str, reply: str) -> None:
    """Any recipient address and upstream reply (multi-line, control characters,
    non-ASCII): the DSN builds, and its status blocks hold exactly the fields we set."""
    import email
    import email.policy

    from relay.delivery.bounce import build_dsn

    failed = [Recipient(address, RecipientState.FAILED, "550 5.1.1 " + reply)]
    dsn = build_dsn(queue_id="Q1", sender="app@example.com", failed=failed,
                    original=b"Subject: hi\r\n\r\nbody\r\n", reporting_mta="relay.test",
                    arrival=0.0, now=0.0)
    report = email.message_from_bytes(dsn, policy=email.policy.SMTP)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    [_, block] = status.get_payload()
    assert block.keys() == ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]
    assert all(line.isascii() and len(line) < 1000 for line in bytes(status).splitlines())


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(
        st.tuples(st.sampled_from([1.0, 2.0, 5.0]), st.integers(1, 4)), min_size=1, max_size=2,
    ),
    durations=st.lists(st.floats(0, 4), min_size=1, max_size=30),
)
def test_rate_limiter_counts_a_send_until_it_ends(
    limits: list[tuple[float, int]], durations: list[float]
) -> None:
    """Sends that take a while (a slow upstream): claimed only when wait_time() says 0 and
    recorded when they end, no window ever holds more than N arrivals at the upstream."""
    limiter = RateLimiter(limits)
    now, ends, running = 0.0, [], []  # running: end times of sends under way
    for duration in durations:
        while True:
            running.sort()
            while running and running[0] <= now:  # sends that ended by now
                limiter.complete(running.pop(0))
            wait = limiter.wait_time(now)
            if wait == 0:
                break
            now = running[0] if wait == UNTIL_A_SEND_ENDS else now + wait
        limiter.reserve()
        running.append(now + duration)
        ends.append(now + duration)  # it arrives upstream at the latest when it ends
    for window, limit in limits:
        for start in ends:
            inside = [t for t in ends if start <= t < start + window - 1e-6]
            assert len(inside) <= limit


def test_rate_limiter_cancelled_reservations_do_not_count() -> None:
    limiter = RateLimiter([(1.0, 2)])
    limiter.reserve(2)
    assert limiter.available(0.0) == 0 and limiter.wait_time(0.0) == UNTIL_A_SEND_ENDS
    limiter.cancel(1)
    assert limiter.available(0.0) == 1 and limiter.wait_time(0.0) == 0
    limiter.complete(0.5)
    assert limiter.available(0.6) == 1 and limiter.wait_time(0.6) == 0
