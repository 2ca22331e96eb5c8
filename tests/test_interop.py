"""What real MTAs do as upstreams (issue 17), taught to the fault-injecting upstream.

421 ends the session wherever it comes, 452 "too many recipients" sends the rest at once,
8-bit bodies never go undeclared, the EHLO name is a domain or an address literal, and a
mixed attempt logs each recipient's fate when it happens.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from relay.app import App
from relay.config.loading import parse_config
from relay.config.report import LOCAL_LITERAL, effective_config
from relay.errors import ConfigError
from relay.queue.types import MessageState, QueuedMessage
from relay.smtp.wire import address_literal
from tests.conftest import (
    Launch,
    StartRelay,
    message,
    relay_config,
    send,
    upstream_account,
    wait_until,
)
from tests.relayproc import write_config
from tests.upstream import FakeUpstream

FAST = {"timeouts": {"command": "3s", "data": "3s"}}


async def deliver(app: App, body: bytes, recipients: list[str] | None = None) -> str:
    """Send one message through the relay, wait until nothing is due; its queue id."""
    code, text = await send(app.smtp_port, body, recipients=recipients)
    assert code == 250, text
    await app.scheduler.run_until_idle()
    return text.rsplit(" ", 1)[-1]


async def final(app: App, queue_id: str) -> QueuedMessage:
    """The message once delivered or failed (retries are 100 ms apart: FAST_RETRY)."""
    for _ in range(250):
        record = await app.store.get(queue_id)
        assert record is not None
        if record.state in (MessageState.DELIVERED, MessageState.FAILED):
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"{queue_id} still {record.state} after 5 s: {record.last_error}")


async def relay_for(up: FakeUpstream, tmp_path: Path, start_relay: StartRelay,
                    **sections: Any) -> App:
    account = upstream_account(up, tmp_path, **FAST, **sections.pop("account", {}))
    return await start_relay(relay_config(tmp_path, {"up": account}, **sections))


def commands_on(up: FakeUpstream, connection: int) -> list[str]:
    return [verb for cid, verb in up.commands if cid == connection]


# -- 17.1: any 421 ends the session ---------------------------------------------------

STAGES = {
    # Exim's smtp_accept_max_per_connection: 421 at MAIL, connection left open.
    "mail-open": lambda up: up.reply_to("MAIL", 421, "4.7.0 too many messages in this"
                                                     " connection"),
    "rcpt-close": lambda up: up.reply_to("RCPT", 421, "4.3.2 shutting down", close=True),
    "data-open": lambda up: up.reply_to("DATA", 421, "4.3.2 busy"),
    "after-dot-open": lambda up: up.fail_data(421, "4.3.0 cannot take it now"),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("pipelines", [True, False], ids=["pipelining", "lockstep"])
async def test_a_421_closes_the_connection_and_the_message_goes_out_on_another_at_once(
    tmp_path: Path, start_relay: StartRelay, stage: str, pipelines: bool
) -> None:
    async with FakeUpstream(pipelining=pipelines) as up:
        app = await relay_for(up, tmp_path, start_relay)
        STAGES[stage](up)
        queue_id = await deliver(app, message("421"))
        record = await final(app, queue_id)
        assert record.state is MessageState.DELIVERED
        assert record.attempts == 1, "the 421 was not counted as an attempt"
        assert [m.connection_id for m in up.messages] == [2]
        # Nothing more was said on the connection after its 421: no RSET, no reuse.
        first = commands_on(up, 1)
        assert "RSET" not in first and first.count("MAIL") == 1, first
        await up.wait_for_connections_open(1)


async def test_a_second_421_defers_with_the_servers_text(
    tmp_path: Path, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded: one more connection, then an ordinary deferral that quotes the 421 (it
    used to say 'upstream closed the connection' when the server hung up after it)."""
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay)
        up.reply_to("RCPT", 421, "4.3.2 shutting down", times=2, close=True)
        with caplog.at_level(logging.INFO, logger="relay.delivery"):
            queue_id = await deliver(app, message("twice"))
        deferred = [r for r in caplog.records if getattr(r, "event", "") == "deferred"]
        assert len(deferred) == 1
        assert deferred[0].fields["reason"] == "421 4.3.2 shutting down"  # type: ignore[attr-defined]
        record = await final(app, queue_id)
        assert record.state is MessageState.DELIVERED
        assert record.attempts == 2 and up.connections_opened == 3


async def test_an_unasked_421_on_an_idle_connection_is_not_an_attempt(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """A server's 421 before an idle close, read at the next use of the connection."""
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay)
        await deliver(app, message("one"))
        await up.say_unasked("421 4.4.2 idle too long")
        queue_id = await deliver(app, message("two"))
        record = await final(app, queue_id)
        assert record.state is MessageState.DELIVERED
        assert record.attempts == 1 and up.connections_opened == 2


# -- 17.6: 452 too many recipients ----------------------------------------------------

@pytest.mark.parametrize("pipelines", [True, False], ids=["pipelining", "lockstep"])
async def test_recipients_over_the_servers_limit_go_in_more_transactions_at_once(
    tmp_path: Path, start_relay: StartRelay, pipelines: bool
) -> None:
    recipients = [f"r{i}@example.com" for i in range(5)]
    async with FakeUpstream(recipient_limit=2, pipelining=pipelines) as up:
        app = await relay_for(up, tmp_path, start_relay)
        queue_id = await deliver(app, message("many"), recipients)
        record = await final(app, queue_id)
        assert record.state is MessageState.DELIVERED
        assert record.attempts == 1, "the rest waited for a retry"
        assert [m.rcpt_tos for m in up.messages] == [
            tuple(recipients[:2]), tuple(recipients[2:4]), tuple(recipients[4:])]
        assert {m.connection_id for m in up.messages} == {1}


async def test_a_421_after_some_transactions_keeps_what_was_delivered(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """The first batch has the message: only the rest wait for a retry (no duplicate)."""
    async with FakeUpstream(recipient_limit=1) as up:
        app = await relay_for(up, tmp_path, start_relay)
        up.reply_to("MAIL", 421, "4.7.0 too many messages in this connection", after=1)
        queue_id = await deliver(app, message("batch"), ["a@example.com", "b@example.com"])
        record = await final(app, queue_id)
        assert record.state is MessageState.DELIVERED
        assert record.attempts == 2
        assert up.recipients_received() == ["a@example.com", "b@example.com"]


@pytest.mark.slow
async def test_kill_9_between_split_transactions_resends_only_the_rest(
    tmp_path: Path, launch: Launch
) -> None:
    """Each transaction's accepted recipients are stored when its 250 arrives: a kill -9
    while the next transaction is under way resends only that one's (was: r0, r1 twice)."""
    recipients = [f"r{i}@example.com" for i in range(6)]
    async with FakeUpstream(recipient_limit=2) as up:
        up.delay("MAIL", 60, after=1)  # the second transaction hangs at MAIL
        config = write_config(tmp_path, up)
        relay = await launch(config)
        await relay.wait_started()
        code, text = await send(relay.port, message("split"), recipients=recipients)
        assert code == 250, text
        await up.wait_for_messages(1)
        await wait_until(lambda: len(up.times_of("MAIL")) >= 2, what="the second MAIL")
        relay.proc.send_signal(signal.SIGKILL)
        assert await relay.exit_code(within=5) == -signal.SIGKILL

        up.clear_faults()
        restarted = await launch(config)
        await restarted.wait_started()
        await up.wait_for_messages(3, timeout=10)
        restarted.proc.send_signal(signal.SIGTERM)
        assert await restarted.exit_code(within=10) == 0
        assert sorted(up.recipients_received()) == recipients  # each exactly once


# -- 17.5: 8-bit data to a server without 8BITMIME ------------------------------------

async def test_8bit_body_to_a_server_without_8bitmime_fails_clearly(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    async with FakeUpstream(eightbitmime=False) as up:
        app = await relay_for(up, tmp_path, start_relay)
        queue_id = await deliver(app, message("8bit", body="caf\u00e9\r\n"))
        record = await final(app, queue_id)
        assert record.state is MessageState.FAILED
        assert record.last_error.startswith("<to@example.com>: 554 5.6.3 upstream does not"
                                            " support 8BITMIME"), record.last_error
        assert up.messages == []
        # 7-bit mail still goes, without a BODY= the server did not offer.
        await deliver(app, message("ascii"))
        assert len(up.messages) == 1
        assert not any(o.startswith("BODY=") for o in up.messages[0].mail_options)


async def test_8bit_body_to_a_server_with_8bitmime_goes_unchanged(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay)
        body = message("8bit", body="caf\u00e9\r\n")
        await deliver(app, body)
        assert [m.data for m in up.messages] == [body]


@pytest.mark.parametrize("declared", [None, ["BODY=7BIT"]], ids=["undeclared", "7bit"])
async def test_an_8bit_body_is_declared_8bitmime_upstream(
    tmp_path: Path, start_relay: StartRelay, declared: list[str] | None
) -> None:
    """A client that sent 8-bit data without BODY=8BITMIME (or with BODY=7BIT): relay
    declares it to the upstream (was: sent undeclared, or as 7BIT)."""
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay)
        body = message("8bit", body="caf\u00e9\r\n")
        code, text = await send(app.smtp_port, body, mail_options=declared)
        assert code == 250, text
        await up.wait_for_messages(1)
        assert up.messages[0].data == body
        assert [o for o in up.messages[0].mail_options if o.startswith("BODY=")] == [
            "BODY=8BITMIME"]
        # A 7-bit body keeps what its client declared.
        assert (await send(app.smtp_port, message("ascii"), mail_options=declared))[0] == 250
        await up.wait_for_messages(2)
        assert [o for o in up.messages[1].mail_options if o.startswith("BODY=")] == (
            declared or [])


# -- 17.3: the EHLO name --------------------------------------------------------------

async def test_ehlo_uses_hostname_and_an_accounts_ehlo_name(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as up, FakeUpstream() as other:
        accounts = {
            "up": upstream_account(up, tmp_path, **FAST),
            "other": upstream_account(other, tmp_path, ehlo_name="out.example.net", **FAST),
        }
        config = relay_config(tmp_path, accounts, hostname="relay.example.com")
        app = await start_relay(config)
        await deliver(app, message("named"))
        await deliver(app, message("other", headers={"X-Account": "other"}))
        assert up.ehlo_names == ["relay.example.com"]
        assert other.ehlo_names == ["out.example.net"]
        reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port)
        banner = await reader.readline()
        writer.close()
        await writer.wait_closed()
        assert banner.startswith(b"220 relay.example.com "), banner


@pytest.mark.parametrize(("fqdn", "expected"), [("vm", "[127.0.0.1]"),
                                                ("vm.example.org", "vm.example.org")])
async def test_default_ehlo_name_is_the_fqdn_or_an_address_literal_never_a_bare_name(
    tmp_path: Path, start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch,
    fqdn: str, expected: str
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *a: fqdn)
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay)
        await deliver(app, message("default"))
        assert up.ehlo_names == [expected]
        reader, writer = await asyncio.open_connection("127.0.0.1", app.smtp_port)
        banner = await reader.readline()
        writer.close()
        await writer.wait_closed()
        assert banner.startswith(f"220 {expected} ".encode()), banner


@pytest.mark.parametrize("key", ["hostname", "ehlo_name"])
def test_a_bare_hostname_is_a_config_error_naming_the_key(key: str) -> None:
    account: dict[str, Any] = {"host": "smtp.example.com"}
    data: dict[str, Any] = {"accounts": {"up": account}, "routing": {"default_account": "up"}}
    if key == "hostname":
        data["hostname"] = "vm"
    else:
        account["ehlo_name"] = "vm"
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    where = "hostname" if key == "hostname" else "accounts.up.ehlo_name"
    assert str(raised.value).startswith(f"{where}: 'vm' is not a fully qualified domain name")


def test_check_config_shows_the_effective_names() -> None:
    data = {"accounts": {"a": {"host": "smtp.example.com"},
                         "b": {"host": "smtp.example.com", "ehlo_name": "[192.0.2.7]"}},
            "routing": {"default_account": "a"}}
    shown = effective_config(parse_config(data), "vm")
    assert shown["hostname"] == LOCAL_LITERAL
    assert [shown["accounts"][n]["ehlo_name"] for n in "ab"] == [LOCAL_LITERAL, "[192.0.2.7]"]
    shown = effective_config(parse_config({**data, "hostname": "relay.example.com"}), "vm")
    assert shown["accounts"]["a"]["ehlo_name"] == "relay.example.com"


def test_address_literals() -> None:
    assert address_literal("127.0.0.1") == "[127.0.0.1]"
    assert address_literal("::1") == "[IPv6:::1]"
    assert address_literal("fe80::1%eth0") == "[IPv6:fe80::1]"
    assert address_literal("::ffff:192.0.2.1") == "[192.0.2.1]"


# -- 17.7: a mixed attempt logs every recipient's fate --------------------------------

async def test_a_mixed_attempt_logs_the_permanent_failures_when_they_happen(
    tmp_path: Path, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay)
        up.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
        up.refuse_rcpt("busy@example.com", 451, "4.2.0 busy", times=1)
        with caplog.at_level(logging.INFO, logger="relay.delivery"):
            queue_id = await deliver(app, message("mixed"), ["ok@example.com",
                                                              "gone@example.com",
                                                              "busy@example.com"])
            await final(app, queue_id)
        lines = [(r.event, r.fields) for r in caplog.records  # type: ignore[attr-defined]
                 if getattr(r, "queue_id", None) == queue_id]
        events = [(name, fields["attempt"]) for name, fields in lines]
        assert events == [("deferred", 1), ("recipients_delivered", 1),
                          ("recipients_failed", 1), ("delivered", 2)]
        by_name = dict(lines)
        assert by_name["recipients_delivered"]["to"] == "<ok@example.com>"
        assert by_name["recipients_failed"]["to"] == "<gone@example.com>"
        assert by_name["recipients_failed"]["reason"] == (
            "<gone@example.com>: 550 5.1.1 no such user")
        assert "busy" in by_name["deferred"]["reason"]


async def test_starttls_stays_required_after_the_ehlo_rework(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """relay now sends EHLO and STARTTLS itself: a server without STARTTLS still gets
    neither the password nor the message."""
    async with FakeUpstream() as up:
        app = await relay_for(up, tmp_path, start_relay, account={"tls": "starttls"})
        queue_id = await deliver(app, message("plain?"))
        record = await app.store.get(queue_id)
        assert record is not None and record.state is MessageState.DEFERRED
        assert "STARTTLS" in record.last_error
        assert [verb for _, verb in up.commands] == ["EHLO"]


async def test_a_reloaded_hostname_is_the_ehlo_name_of_new_connections(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    async with FakeUpstream() as up:
        account = upstream_account(up, tmp_path, **FAST)
        app = await start_relay(relay_config(tmp_path, {"up": account},
                                             hostname="old.example.com"))
        await deliver(app, message("before"))
        notes = await app.reload(relay_config(tmp_path, {"up": account},
                                              hostname="new.example.com"))
        assert any(n.startswith("hostname changed") for n in notes)
        await deliver(app, message("after"))
        assert up.ehlo_names == ["old.example.com", "new.example.com"]
