"""Upstream transactions with and without PIPELINING (RFC 2920), against real servers.

``ScriptedUpstream`` is a small hand-written SMTP server (aiosmtpd cannot hold its replies
back): with PIPELINING it answers nothing of an envelope until DATA has arrived, so a
client that waits for the reply to MAIL hangs; without it, it counts every read that
held more than one command, which a client in lock-step never sends.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.queue.types import MessageState, RecipientState
from tests.conftest import StartRelay, message, relay_config, send, wait_until
from tests.upstream import FakeUpstream

FAST = {"timeouts": {"command": "3s", "data": "3s"}}


@dataclass
class ScriptedUpstream:
    pipelining: bool
    mail_code: int = 250
    refuse: set[str] = field(default_factory=set)  # RCPT addresses answered 550
    data_always: bool = False  # 354 to DATA even when no recipient was accepted
    groups: list[list[str]] = field(default_factory=list)  # verbs answered together
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)
    empty_data: int = 0  # transactions ended with the lone dot, nothing accepted
    multi_command_reads: int = 0
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Session(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def account(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "tls": "none", **FAST}


class _Session(asyncio.Protocol):
    def __init__(self, up: ScriptedUpstream) -> None:
        self.up = up
        self.buffer = b""
        self.in_data = False
        self.body = b""
        self.owed: list[str] = []  # replies held back until the group ends
        self.verbs: list[str] = []
        self.mail_ok = False
        self.accepted: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's: no subclass)
        self.up.connections += 1
        self.transport.write(b"220 scripted ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if not self.in_data and data.count(b"\r\n") > 1 and not self.up.pipelining:
            self.up.multi_command_reads += 1
        self.buffer += data
        while True:
            if self.in_data:
                end = (b"\r\n" + self.buffer).find(b"\r\n.\r\n")
                if end == -1:
                    return
                self.body, self.buffer = self.buffer[:end], self.buffer[end + 3 :]
                self.in_data = False
                self._end_of_data()
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            self._command(line.decode())

    def _command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        self.verbs.append(verb)
        if verb == "EHLO":
            extra = "250-PIPELINING\r\n" if self.up.pipelining else ""
            self._reply(f"250-scripted\r\n{extra}250 8BITMIME", last=True)
        elif verb == "MAIL":
            self.mail_ok = self.up.mail_code == 250
            self.accepted = []
            self._reply(f"{self.up.mail_code} 5.7.1 sender refused" if not self.mail_ok
                        else "250 2.1.0 ok", last=False)
        elif verb == "RCPT":
            address = line[line.index("<") + 1 : line.index(">")]
            if not self.mail_ok:
                self._reply("503 5.5.1 need MAIL", last=False)
            elif address in self.up.refuse:
                self._reply("550 5.1.1 no such user", last=False)
            else:
                self.accepted.append(address)
                self._reply("250 2.1.5 ok", last=False)
        elif verb == "DATA":
            if self.accepted or self.up.data_always:
                self.in_data = True
                self._reply("354 go ahead", last=True)
            else:
                self._reply("554 5.5.1 no valid recipients", last=True)
        elif verb == "QUIT":
            self._reply("221 bye", last=True)
            self.transport.close()
        else:  # RSET, NOOP
            self.mail_ok, self.accepted = False, []
            self._reply("250 ok", last=True)

    def _reply(self, text: str, *, last: bool) -> None:
        self.owed.append(text + "\r\n")
        if last or not self.up.pipelining:
            self.up.groups.append(self.verbs)
            self.verbs = []
            self.transport.write("".join(self.owed).encode())
            self.owed = []

    def _end_of_data(self) -> None:
        if self.mail_ok and self.accepted:
            self.up.messages.append((self.accepted, self.body))
            self.transport.write(b"250 2.0.0 queued\r\n")
        else:
            self.up.empty_data += 1
            self.transport.write(b"554 5.5.1 no valid recipients\r\n")


@pytest.fixture
async def pipelining() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(pipelining=True) as up:
        yield up


async def test_envelope_goes_in_one_write_when_the_server_pipelines(
    tmp_path: Path, pipelining: ScriptedUpstream, start_relay: StartRelay
) -> None:
    app = await start_relay(relay_config(tmp_path, {"up": pipelining.account()}))
    body = message("pipelined", body="one\r\n.two\r\n")
    code, _ = await send(app.smtp_port, body, recipients=["a@example.com", "b@example.com"])
    assert code == 250
    await wait_until(lambda: len(pipelining.messages) == 1, what="the message upstream")
    assert ["MAIL", "RCPT", "RCPT", "DATA"] in pipelining.groups, pipelining.groups
    recipients, data = pipelining.messages[0]
    assert recipients == ["a@example.com", "b@example.com"]
    assert data == body.replace(b"\r\n.two", b"\r\n..two")  # still dot-stuffed on the wire


async def test_commands_go_one_at_a_time_when_the_server_does_not_pipeline(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    async with ScriptedUpstream(pipelining=False) as up:
        app = await start_relay(relay_config(tmp_path, {"up": up.account()}))
        for i in range(3):
            code, _ = await send(app.smtp_port, message(f"m{i}"),
                                 recipients=["a@example.com", "b@example.com"])
            assert code == 250
        await wait_until(lambda: len(up.messages) == 3, what="three messages upstream")
        assert up.multi_command_reads == 0
        assert all(len(group) == 1 for group in up.groups), up.groups


async def test_data_started_after_every_recipient_was_refused_is_ended_and_reset(
    tmp_path: Path, pipelining: ScriptedUpstream, start_relay: StartRelay
) -> None:
    """RFC 2920 3.1: a 354 with no recipient accepted gets the lone dot, then RSET; the
    message fails per recipient and the connection carries the next message."""
    pipelining.refuse = {"gone@example.com"}
    pipelining.data_always = True
    app = await start_relay(relay_config(tmp_path, {"up": pipelining.account()}))
    code, text = await send(app.smtp_port, message("nobody"), recipients=["gone@example.com"])
    assert code == 250
    record_id = text.rsplit(" ", 1)[-1]

    async def state() -> MessageState | None:
        return await app.store.state_of(record_id)

    await wait_until(lambda: pipelining.empty_data == 1, what="the empty transaction")
    code, _ = await send(app.smtp_port, message("next"), recipients=["ok@example.com"])
    await wait_until(lambda: len(pipelining.messages) == 1, what="the next message")
    assert pipelining.messages[0][0] == ["ok@example.com"]
    assert pipelining.connections == 1
    assert any(g[:1] == ["RSET"] for g in pipelining.groups), pipelining.groups
    record = await app.store.get(record_id)
    assert record is not None and record.state is MessageState.FAILED
    assert [r.state for r in record.recipients] == [RecipientState.FAILED]
    assert "550" in record.recipients[0].reply


@pytest.mark.parametrize("pipelines", [True, False], ids=["pipelining", "lockstep"])
async def test_refused_sender_fails_the_message_with_the_reply(
    tmp_path: Path, start_relay: StartRelay, pipelines: bool
) -> None:
    async with ScriptedUpstream(pipelining=pipelines, mail_code=550) as up:
        app = await start_relay(relay_config(tmp_path, {"up": up.account()}))
        code, text = await send(app.smtp_port, message("refused"))
        assert code == 250
        record_id = text.rsplit(" ", 1)[-1]
        await app.scheduler.run_until_idle()
        record = await app.store.get(record_id)
        assert record is not None and record.state is MessageState.FAILED
        assert "550" in record.last_error and "sender refused" in record.last_error
        assert up.messages == [] and up.multi_command_reads == 0


@pytest.mark.parametrize("pipelines", [True, False], ids=["pipelining", "lockstep"])
async def test_each_recipient_gets_its_own_outcome_either_way(
    tmp_path: Path, start_relay: StartRelay, pipelines: bool
) -> None:
    """The aiosmtpd upstream, with and without PIPELINING advertised."""
    async with FakeUpstream(pipelining=pipelines) as up:
        from tests.conftest import upstream_account

        app = await start_relay(relay_config(tmp_path, {"up": upstream_account(up, tmp_path)}))
        up.refuse_rcpt("gone@example.com", 550, "5.1.1 no such user")
        up.refuse_rcpt("busy@example.com", 451, "4.2.0 busy", times=1)
        code, _ = await send(app.smtp_port, message("three"),
                             recipients=["ok@example.com", "gone@example.com",
                                         "busy@example.com"])
        assert code == 250
        await up.wait_for_messages(2)
        await app.scheduler.run_until_idle()
        assert [m.rcpt_tos for m in up.messages] == [("ok@example.com",), ("busy@example.com",)]
        # Everything refused: no DATA, an RSET, and the same connection goes on.
        code, _ = await send(app.smtp_port, message("none"), recipients=["gone@example.com"])
        # Settled before the next is sent: with both in flight at once the pool may open a
        # second connection for the second (CI under load did), which is not under test.
        await app.scheduler.run_until_idle()
        code, _ = await send(app.smtp_port, message("after"), recipients=["ok@example.com"])
        await up.wait_for_messages(3)
        assert up.connections_opened == 1
        assert [v for _, v in up.commands].count("RSET") >= 1


class _Keep:
    """aiosmtpd handler: offers PIPELINING, keeps what it gets."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(envelope.original_content)
        return "250 2.0.0 ok"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_pipelined_delivery_over_tls(
    tmp_path: Path, start_relay: StartRelay, self_signed: tuple[Path, Path], mode: str
) -> None:
    """The channel takes over the TLS transport aiosmtplib set up, and reuses it."""
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    keep = _Keep()
    loop = asyncio.get_running_loop()
    connections = 0

    def session() -> SMTP:
        nonlocal connections
        connections += 1
        if mode == "starttls":
            return SMTP(keep, hostname="tls.test", tls_context=context, require_starttls=True)
        return SMTP(keep, hostname="tls.test")

    server = await loop.create_server(session, "127.0.0.1", 0,
                                      ssl=context if mode == "implicit" else None)
    port = server.sockets[0].getsockname()[1]
    try:
        account = {"host": "127.0.0.1", "port": port, "tls": mode, "tls_verify": False, **FAST}
        app = await start_relay(relay_config(tmp_path, {"up": account}))
        bodies = [message(f"tls {i}", body=f".dot {i}\r\n") for i in range(3)]
        for n, body in enumerate(bodies, 1):  # one after another: one connection does
            code, _ = await send(app.smtp_port, body)
            assert code == 250
            await wait_until(lambda n=n: len(keep.messages) == n, what=f"message {n} over TLS")
        assert sorted(keep.messages) == sorted(bodies)
        assert connections == 1
    finally:
        server.close()
