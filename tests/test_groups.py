"""Account groups (issue 15.2): failover and weighted, the account decided at each
attempt, each attempt recording its account; account-level failures move the message
on, a refused recipient is final; nothing lost and nothing sent twice under load."""

from __future__ import annotations

import asyncio
import collections
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.config.loading import parse_config
from relay.delivery.groups import Group, order
from relay.errors import ConfigError
from tests.conftest import (
    StartRelay,
    message,
    relay_config,
    send,
    send_many,
    upstream_account,
    wait_until,
    webhook_block,
)
from tests.upstream import FakeUpstream
from tests.webhook import WebhookReceiver


def test_failover_keeps_the_list_order_and_weighted_draws_by_weight() -> None:
    assert order(Group("g", ("a", "b", "c")), random.Random(1)) == ["a", "b", "c"]
    weighted = Group("g", ("a", "b"), "weighted", {"a": 3, "b": 1})
    rng = random.Random(7)
    firsts = collections.Counter(order(weighted, rng)[0] for _ in range(4000))
    assert 2.6 < firsts["a"] / firsts["b"] < 3.4
    assert sorted(order(weighted, rng)) == ["a", "b"]  # the other follows as a fallback


def _config(groups: dict[str, Any], **routing: Any) -> dict[str, Any]:
    return {"accounts": {"a": {"transport": "maildir", "path": "/tmp/a"},
                         "b": {"transport": "maildir", "path": "/tmp/b"}},
            "routing": {"default_account": "a", "groups": groups, **routing}}


@pytest.mark.parametrize(("groups", "problem"), [
    ({"g": {"accounts": ["a", "nope"]}}, "routing.groups.g.accounts: no account named 'nope'"),
    ({"g": {"accounts": ["a", "h"]}, "h": {"accounts": ["b", "g"]}},
     "routing.groups.g.accounts: 'h' is a group"),
    ({"a": {"accounts": ["b"]}}, "routing.groups.a: an account has that name too"),
    ({"g": {"accounts": ["a", "b"], "mode": "weighted", "weights": {"a": 3}}},
     "routing.groups.g.weights: give each of a, b a weight"),
    ({"g": {"accounts": ["a", "b"], "mode": "weighted", "weights": {"a": 3, "b": 0}}},
     "routing.groups.g.weights.b: "),
    ({"g": {"accounts": ["a", "b"], "weights": {"a": 1, "b": 1}}},
     "routing.groups.g.weights: only for mode: weighted"),
    ({"g": {"accounts": ["a", "a"]}}, "routing.groups.g.accounts: an account is listed twice"),
])
def test_bad_groups_name_the_key(groups: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(groups), secrets=False)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_rules_and_the_default_may_name_a_group() -> None:
    config = parse_config(_config({"g": {"accounts": ["b", "a"]}}, default_account="g",
                                  rules=[{"sender": "@x.com", "account": "g"}]), secrets=False)
    assert config.routing.default_account == "g"


def _group_config(tmp_path: Path, first: FakeUpstream, second: FakeUpstream,
                  *, sections: dict[str, Any] | None = None,
                  members: dict[str, dict[str, Any]] | None = None, **group: Any) -> Any:
    extra = members or {}
    return relay_config(
        tmp_path, {"first": upstream_account(first, tmp_path, **extra.get("first", {})),
                   "second": upstream_account(second, tmp_path, **extra.get("second", {}))},
        routing={"default_account": "mail",
                 "groups": {"mail": {"accounts": ["first", "second"], **group}}},
        **(sections or {}))


async def test_group_mail_makes_one_webhook_event_per_outcome(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    webhook: WebhookReceiver,
) -> None:
    """a3 #1: mail through a group reports delivered, deferred and failed like any other,
    naming the member account that sent it."""
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(
            tmp_path, upstream, second,
            sections={"events": {"webhooks": [webhook_block(webhook, tmp_path)]}}))
        assert (await send(app.smtp_port, message("fine")))[0] == 250
        await webhook.wait_for(1)
        upstream.fail_data(451, "4.3.0 try later")  # a message's refusal: not failed over
        assert (await send(app.smtp_port, message("later")))[0] == 250
        await webhook.wait_for(3)  # deferred, then delivered on the retry
        upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
        assert (await send(app.smtp_port, message("gone"),
                           recipients=["gone@example.com"]))[0] == 250
        await webhook.wait_for(4)
        await app.scheduler.run_until_idle()
    kinds = [(e["type"], e["account"]) for e in webhook.events]
    assert kinds == [("delivered", "first"), ("deferred", "first"), ("delivered", "first"),
                     ("failed", "first")]
    assert webhook.bad_signatures == 0 and second.messages == []


async def test_a_member_rewrites_group_mail_as_its_own(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
) -> None:
    """a3 #2: a message sent through member A goes out as A's own mail would: A's
    rewrite (envelope sender and From) applies, B's when B sends it."""
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second, members={
            "first": {"rewrite": {"envelope_from": "first@relay.example",
                                  "header_from": "replace"}},
            "second": {"rewrite": {"envelope_from": "second@relay.example"}}}))
        password, upstream.password = upstream.password, "changed-at-the-provider"
        assert (await send(app.smtp_port, message("via second")))[0] == 250
        await second.wait_for_messages(1)  # first refused the login: second sent it
        upstream.password = password
        await wait_until(lambda: not app.scheduler.workers["first"].backed_off,
                         what="first's auth backoff to end")
        assert (await send(app.smtp_port, message("via first")))[0] == 250
        await upstream.wait_for_messages(1)
        await app.scheduler.run_until_idle()
    [one] = upstream.messages
    [two] = second.messages
    assert one.mail_from == "first@relay.example"
    assert b"\r\nFrom: first@relay.example\r\n" in b"\r\n" + one.data
    assert two.mail_from == "second@relay.example"
    assert b"From: app@example.com" in two.data  # second keeps the From header


async def test_an_account_level_failure_moves_the_send_to_the_next_account(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with FakeUpstream() as second:
        config = _group_config(tmp_path, upstream, second)
        app = await start_relay(config)
        upstream.password = "changed-at-the-provider"  # first: every login refused (535)
        code, _ = await send(app.smtp_port, message("failover"))
        assert code == 250
        await second.wait_for_messages(1)
        await app.scheduler.run_until_idle()
        assert upstream.messages == []
        [queued] = await app.store.list_messages()
        assert (queued.account, str(queued.state)) == ("mail", "delivered")
        assert app.scheduler.workers["first"].backed_off  # the member backs off
        # The attempt records the account it used; `queue show` shows it.
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({
            "accounts": {"first": {"transport": "maildir", "path": str(tmp_path / "f")},
                         "second": {"transport": "maildir", "path": str(tmp_path / "s")}},
            "queue": {"path": str(config.queue.path)},
            "routing": {"default_account": "mail",
                        "groups": {"mail": {"accounts": ["first", "second"]}}}}))
        code = await asyncio.to_thread(main, ["queue", "show", queued.id, "-c", str(path)])
        shown = capsys.readouterr().out
        assert code == 0
        attempts = shown[shown.index("attempts:"):]
        assert " second delivered:" in attempts and " first " not in attempts


async def test_a_refused_recipient_is_final_and_not_tried_elsewhere(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        upstream.refuse_rcpt("gone@example.com", 550, "5.1.1 No such user")
        code, _ = await send(app.smtp_port, message("final"),
                             recipients=["gone@example.com", "ok@example.com"])
        assert code == 250
        await app.scheduler.run_until_idle()
        assert [m.rcpt_tos for m in upstream.messages] == [("ok@example.com",)]
        assert second.messages == []
        [queued] = await app.store.list_messages()
        states = {r.address: str(r.state) for r in queued.recipients}
        assert states == {"gone@example.com": "failed", "ok@example.com": "delivered"}


async def test_a_group_fails_over_under_load_with_nothing_lost_or_sent_twice(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        bodies = [message(f"load {i}") for i in range(60)]
        sending = asyncio.create_task(send_many(app.smtp_port, bodies, sessions=4))
        await upstream.wait_for_messages(10)
        # Gmail's daily quota, mid-run: account-wide, at MAIL, for every later message.
        upstream.fail_mail(550, "5.4.5 Daily user sending quota exceeded")
        assert all(code == 250 for code, _ in await sending)
        await app.scheduler.run_until_idle()
        subjects = collections.Counter(
            line for m in [*upstream.messages, *second.messages]
            for line in m.data.decode().splitlines() if line.startswith("Subject:"))
        assert sorted(subjects) == sorted(f"Subject: load {i}" for i in range(60))
        assert set(subjects.values()) == {1}  # each exactly once
        assert second.messages  # the second account took over
        states = collections.Counter(str(m.state) for m in await app.store.list_messages())
        assert states == {"delivered": 60}


async def test_weighted_spreads_by_weight(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second, mode="weighted",
                                              weights={"first": 1, "second": 1}))
        replies = await send_many(app.smtp_port, [message(f"w{i}") for i in range(40)])
        assert all(code == 250 for code, _ in replies)
        await app.scheduler.run_until_idle()
        assert len(upstream.messages) + len(second.messages) == 40
        assert upstream.messages and second.messages  # (1 in 5e11 to fail by chance)


async def test_reload_adds_and_changes_a_group(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        accounts = {"first": upstream_account(upstream, tmp_path),
                    "second": upstream_account(second, tmp_path)}
        app = await start_relay(relay_config(tmp_path, accounts))
        await app.reload(relay_config(tmp_path, accounts, routing={
            "default_account": "mail", "groups": {"mail": {"accounts": ["second", "first"]}}}))
        assert (await send(app.smtp_port, message("via the new group")))[0] == 250
        await second.wait_for_messages(1)
        await app.reload(relay_config(tmp_path, accounts, routing={
            "default_account": "mail", "groups": {"mail": {"accounts": ["first", "second"]}}}))
        assert (await send(app.smtp_port, message("in the new order")))[0] == 250
        await upstream.wait_for_messages(1)
        await app.scheduler.run_until_idle()
        assert len(second.messages) == 1
        # A reload that leaves the group alone keeps its worker (and what it holds).
        worker = app.scheduler.workers["mail"]
        await app.reload(relay_config(tmp_path, accounts, routing={
            "default_account": "mail", "groups": {"mail": {"accounts": ["first", "second"]}}},
            bounces={"enabled": True}))
        assert app.scheduler.workers["mail"] is worker


async def test_a_slow_down_through_the_group_throttles_the_member(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        upstream.fail_data(454, "Throttling failure: Maximum sending rate exceeded.")
        assert (await send(app.smtp_port, message("slow")))[0] == 250
        await app.scheduler.run_until_idle()
        assert app.scheduler.workers["first"].throttle.factor == 0.5
        assert app.scheduler.workers["second"].throttle.factor == 1.0
        await wait_until(lambda: len(upstream.messages) + len(second.messages) == 1,
                         what="the retry")  # deferred once, then delivered: not lost


# -- the attack round (a2 #1, #2, #3, #6, #8) ---------------------------------------------


@pytest.mark.parametrize("fault", ["rcpt", "dot"])
async def test_a_member_quota_at_any_step_fails_over_in_the_same_attempt(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, fault: str
) -> None:
    """Gmail's 5.4.5 to every RCPT, or SES's "454 Throttling failure: Daily message quota
    exceeded" after the dot: the member backs off, the send moves on, the group does not
    back off."""
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        rcpts = ["a@example.com", "b@example.com"]
        if fault == "rcpt":
            for rcpt in rcpts:
                upstream.refuse_rcpt(rcpt, 550, "5.4.5 Daily user sending quota exceeded")
        else:
            upstream.fail_data(454, "Throttling failure: Daily message quota exceeded.")
        assert (await send(app.smtp_port, message("quota"), recipients=rcpts))[0] == 250
        await second.wait_for_messages(1)
        await app.scheduler.run_until_idle()
        [queued] = await app.store.list_messages()
        assert (str(queued.state), queued.attempts) == ("delivered", 1)
        assert sorted(second.messages[0].rcpt_tos) == rcpts
        workers = app.scheduler.workers
        assert workers["first"].backed_off and workers["first"].throttle.factor == 1.0
        assert not workers["mail"].backed_off and workers["mail"].backoff_failures == 0


async def test_a_member_named_wait_holds_the_member_not_the_group(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        upstream.fail_data(451, "4.7.0 Try again in 30 seconds")
        assert (await send(app.smtp_port, message("held")))[0] == 250
        await wait_until(lambda: app.scheduler.workers["first"].throttle.held(
            app.scheduler.workers["first"].mono()) > 0, what="the member's hold")
        group = app.scheduler.workers["mail"]
        assert group.throttle.held(group.mono()) == 0 and group.throttle.factor == 1.0
        assert (await send(app.smtp_port, message("next")))[0] == 250
        await second.wait_for_messages(2)  # the next, and the held one's retry: at once
        assert upstream.messages == []


async def test_a_member_recovers_through_the_group_with_one_probe_first(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """A member whose backoff ended gets one send (a probe), not a burst; a success
    through the group is its recovery (failures reset, status ok)."""
    async with FakeUpstream() as second:
        app = await start_relay(_group_config(tmp_path, upstream, second))
        first = app.scheduler.workers["first"]
        upstream.fail_mail(550, "5.4.5 Daily user sending quota exceeded", times=1)
        assert (await send(app.smtp_port, message("trip")))[0] == 250
        await second.wait_for_messages(1)
        assert first.backoff_failures == 1
        await wait_until(lambda: not first.backed_off, what="the member's backoff to end")
        upstream.delay("DATA", 0.5)  # the probe takes a while: the others must not pile on
        replies = await send_many(app.smtp_port, [message(f"after {i}") for i in range(4)],
                                  sessions=4)
        assert all(code == 250 for code, _ in replies)
        await app.scheduler.run_until_idle()
        assert len(upstream.messages) + len(second.messages) == 5
        assert upstream.connections_open_peak == 1  # one probe at a time, not a burst
        assert first.backoff_failures == 0 and first.last_account_error == ""
