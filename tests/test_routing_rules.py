"""Routing rules (issue 15.1): first match wins, per recipient; X-Account first; a split
message is one 250 and one queue entry per account, committed together."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli.commands import main
from relay.config.loading import load_config
from relay.delivery.rules import Facts, RoutingTable, Rule, decide, route
from relay.errors import ConfigError
from tests.conftest import (
    StartRelay,
    message,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.relayproc import RelayProcess, write_config
from tests.upstream import FakeUpstream

TABLE = RoutingTable("default", (
    Rule("billing", "ses", sender=("@billing.example.com",)),
    Rule("newsletter", "bulk", header=("X-Mailer", "newsletter*")),
    Rule("partner", "partner", recipient_domain=("*.partner.org", "partner.org")),
    Rule("brand", "brand", from_domain=("brand.example",)),
    Rule("app2", "app2", user=("app2",)),
    Rule("ops", "ops", sender=("ops-*@example.com",), recipient_domain=("example.net",)),
))


def _accounts(facts: Facts, requested: str | None = None) -> list[str]:
    return [d.account for d in decide(facts, TABLE, requested)]


def test_each_condition_matches_and_the_first_rule_wins() -> None:
    fields = [("From", "Shop <news@Brand.Example>"), ("X-Mailer", "Newsletter 2.1")]
    assert _accounts(Facts("a@billing.example.com", ("x@y.com",), fields)) == ["ses"]
    assert _accounts(Facts("a@other.com", ("x@y.com",), fields)) == ["bulk"]
    assert _accounts(Facts("a@other.com", ("x@y.com",), fields[:1])) == ["brand"]
    assert _accounts(Facts("a@other.com", ("X@Mail.Partner.org",), [])) == ["partner"]
    assert _accounts(Facts("a@other.com", ("x@y.com",), [], user="app2")) == ["app2"]
    assert _accounts(Facts("a@other.com", ("x@y.com",), [], user=None)) == ["default"]
    # Every condition of a rule must hold: sender and recipient domain.
    assert _accounts(Facts("ops-1@example.com", ("x@example.net",), [])) == ["ops"]
    assert _accounts(Facts("ops-1@example.com", ("x@example.com",), [])) == ["default"]
    # "@domain" is the domain only; the null sender matches no sender rule.
    assert _accounts(Facts("billing.example.com@evil.com", ("x@y.com",), [])) == ["default"]
    assert _accounts(Facts("", ("x@y.com",), [])) == ["default"]


def test_the_null_sender_matches_no_sender_glob_not_even_star() -> None:
    table = RoutingTable("default", (Rule("any", "bulk", sender=("*",)),
                                     Rule("anyat", "bulk", sender=("*@*", "@*"))))
    assert [d.account for d in decide(Facts("", ("x@y.com",), []), table)] == ["default"]
    assert [d.account for d in decide(Facts("a@b.c", ("x@y.com",), []), table)] == ["bulk"]


def test_x_account_decides_before_the_rules() -> None:
    facts = Facts("a@billing.example.com", ("x@partner.org", "y@z.com"), [])
    assert _accounts(facts, requested="bulk") == ["bulk", "bulk"]
    assert decide(facts, TABLE, "bulk")[0].why == "X-Account header names bulk"


def test_recipients_of_different_rules_split_per_account_in_order() -> None:
    facts = Facts("a@other.com", ("a@partner.org", "b@y.com", "c@x.partner.org", "d@y.com"), [])
    decisions = decide(facts, TABLE)
    assert [(d.account, d.rule) for d in decisions] == [
        ("partner", "partner"), ("default", None), ("partner", "partner"), ("default", None)]
    assert "recipient domain partner.org matches 'partner.org'" in decisions[0].why
    assert [(r.account, r.recipients) for r in route(decisions)] == [
        ("partner", ("a@partner.org", "c@x.partner.org")), ("default", ("b@y.com", "d@y.com"))]


def _config(tmp_path: Path, rules: list[dict[str, Any]]) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "accounts": {"a": {"transport": "maildir", "path": str(tmp_path / "a")},
                     "b": {"transport": "maildir", "path": str(tmp_path / "b")}},
        "queue": {"path": str(tmp_path / "q.sqlite3")},
        "routing": {"default_account": "a", "rules": rules},
    }))
    return path


@pytest.mark.parametrize(("rules", "problem"), [
    ([{"sender": "@x.com", "account": "nope"}],
     "routing.rules.0.account: no account or group named"),
    ([{"account": "b"}], "routing.rules.0.account: a rule needs at least one of sender"),
    ([{"sender": "@x.com", "account": "b", "recipient": "x"}],
     "routing.rules.0.recipient: "),
    ([{"header": {"value": "x"}, "account": "b"}], "routing.rules.0.header.name: "),
    ([{"sender": "", "account": "b"}], "routing.rules.0.sender: "),
    ([{"sender": ["@x.com", " "], "account": "b"}], "routing.rules.0.sender: "),
])
def test_bad_rules_name_the_key(tmp_path: Path, rules: list[dict[str, Any]],
                                problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, rules), secrets=False)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_relay_route_prints_rule_account_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, [{"name": "to-partner", "recipient_domain": "partner.org",
                               "account": "b"}])
    code = main(["route", "-c", str(path), "--from", "app@x.com", "--to", "u@partner.org",
                 "--to", "v@other.com", "--header", "Subject: hi"])
    text = capsys.readouterr().out
    assert code == 0
    assert ("<u@partner.org>: account b, by rule 'to-partner' (recipient domain partner.org"
            " matches 'partner.org')") in text
    assert "<v@other.com>: account a, by default" in text
    assert "split into 2 queue entries" in text
    code = main(["route", "-c", str(path), "--from", "app@x.com", "--to", "u@partner.org",
                 "--header", "X-Account: a"])
    assert code == 0 and "account a, by X-Account" in capsys.readouterr().out


async def test_a_split_message_gets_one_250_and_reaches_each_account(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as partner:
        config = relay_config(
            tmp_path, {"main": upstream_account(upstream, tmp_path),
                       "partner": upstream_account(partner, tmp_path)},
            routing={"rules": [{"recipient_domain": "partner.org", "account": "partner"}]})
        app = await start_relay(config)
        code, text = await send(app.smtp_port, message("split"),
                                recipients=["a@partner.org", "b@example.com", "c@partner.org"])
        assert code == 250
        ids = text.removeprefix("2.0.0 queued as ").split()
        assert len(ids) == 2
        await upstream.wait_for_messages(1)
        await partner.wait_for_messages(1)
        assert partner.messages[0].rcpt_tos == ("a@partner.org", "c@partner.org")
        assert upstream.messages[0].rcpt_tos == ("b@example.com",)
        assert upstream.messages[0].data == partner.messages[0].data
        stored = {m.id: m.account for m in await app.store.list_messages()}
        assert stored == {ids[0]: "partner", ids[1]: "main"}
        # X-Account comes first: the whole message goes through the named account.
        code, _ = await send(app.smtp_port, message("named", headers={"X-Account": "main"}),
                             recipients=["d@partner.org"])
        assert code == 250
        await upstream.wait_for_messages(2)
        assert upstream.messages[1].rcpt_tos == ("d@partner.org",)
        assert len(partner.messages) == 1


async def test_a_split_is_committed_all_or_nothing(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    """One entry that cannot be written (text SQLite cannot encode) fails the other too:
    the client gets a 4xx and sends again, and no half of the message is queued."""
    config = relay_config(
        tmp_path, {"main": upstream_account(upstream, tmp_path),
                   "other": upstream_account(upstream, tmp_path)},
        routing={"rules": [{"recipient_domain": "other.org", "account": "other"}]})
    app = await start_relay(config)
    real = app.store.enqueue_all

    async def second_unwritable(messages: Any) -> None:
        bad = messages[1].__class__(**{**messages[1].__dict__, "sender": "\udcff@x.com"})
        await real([messages[0], bad])

    app.store.enqueue_all = second_unwritable  # type: ignore[method-assign]
    code, _ = await send(app.smtp_port, message("half"),
                         recipients=["a@other.org", "b@example.com"])
    assert code == 451
    assert await app.store.list_messages() == []


async def test_reload_applies_new_rules(
    tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as second:
        accounts = {"main": upstream_account(upstream, tmp_path),
                    "second": upstream_account(second, tmp_path)}
        app = await start_relay(relay_config(tmp_path, accounts))
        assert (await send(app.smtp_port, message("before"), sender="app@billing.com"))[0] == 250
        await upstream.wait_for_messages(1)
        await app.reload(relay_config(tmp_path, accounts, routing={
            "rules": [{"sender": "@billing.com", "account": "second"}]}))
        assert (await send(app.smtp_port, message("after"), sender="app@billing.com"))[0] == 250
        await second.wait_for_messages(1)
        await asyncio.sleep(0.1)
        assert len(upstream.messages) == 1


async def test_sighup_reloads_rules_and_refuses_one_naming_an_unknown_account(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with FakeUpstream() as second:
        path = write_config(tmp_path, upstream)
        relay = await RelayProcess.spawn(path, tmp_path)
        try:
            await relay.wait_started()
            data = yaml.safe_load(path.read_text())
            data["accounts"]["second"] = upstream_account(second, tmp_path)
            data["routing"]["rules"] = [{"sender": "@billing.com", "account": "second"}]
            path.write_text(yaml.safe_dump(data))
            relay.proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "relay: reloaded" in relay.stderr, what="the reload")
            code, _ = await send(relay.port, message("by rule"), sender="app@billing.com")
            assert code == 250
            await second.wait_for_messages(1)

            data["routing"]["rules"][0]["account"] = "sceond"
            path.write_text(yaml.safe_dump(data))
            relay.proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "still running with the previous one" in relay.stderr,
                             what="the rejected reload")
            assert "routing.rules.0.account: no account or group named 'sceond'" in relay.stderr
            code, _ = await send(relay.port, message("old rule"), sender="app@billing.com")
            assert code == 250
            await second.wait_for_messages(2)
            assert upstream.messages == []
        finally:
            if relay.proc.returncode is None:
                relay.proc.send_signal(signal.SIGTERM)
        assert await relay.exit_code(within=10) == 0
