"""The SMTP listener (aiosmtpd): validate, parse, commit, answer ``250 2.0.0 queued as ID``.

A thin seam: header parsing, routing and priority are the pure core's; committing is the
``submit`` callback's (the store, through the app). This is the only module that imports
aiosmtpd.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import replies
from relay.config import Config
from relay.errors import StoreError, StoreFullError
from relay.headers import parse_headers, remove_headers
from relay.logs import event
from relay.message import NewMessage, new_queue_id
from relay.metrics import Metrics
from relay.priority import priority_from_headers
from relay.routing import CONTROL_HEADERS, RoutingError, choose_account, deferred_until

log = logging.getLogger("relay.smtpd")
Submit = Callable[[NewMessage], Awaitable[None]]
Admit = Callable[[str], Awaitable[bool]]  # False: the account is too far behind its limit


async def _always(_: str) -> bool:
    return True


class IngestHandler:
    """aiosmtpd handler hooks; each returns the SMTP reply line."""

    def __init__(
        self, config: Config, submit: Submit, metrics: Metrics, admit: Admit = _always
    ) -> None:
        self.config = config
        self.submit = submit
        self.admit = admit
        self.metrics = metrics
        self.accepting = True

    def _reject(self, reason: str, reply: replies.Reply) -> str:
        self.metrics.rejected.labels(reason).inc()
        return str(reply)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.listen.max_recipients:
            return self._reject("too_many_recipients", replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RCPT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.accepting:
            return str(replies.SHUTTING_DOWN)
        raw = envelope.original_content or b""
        fields = parse_headers(raw)
        try:
            account = choose_account(fields, self.config.routing.default_account,
                                     self.config.accounts)
            not_before = deferred_until(fields)
        except RoutingError as exc:
            reason = "unknown_account" if "Account" in str(exc) else "bad_header"
            reply = replies.UNKNOWN_ACCOUNT if reason == "unknown_account" else replies.BAD_HEADER
            return self._reject(reason, reply.with_text(str(exc)))
        if not await self.admit(account):
            return self._reject("rate_limited", replies.RATE_LIMITED)
        now = time.time()
        message = NewMessage(
            id=new_queue_id(),
            sender=_reverse_path(envelope.mail_from),
            recipients=tuple(envelope.rcpt_tos),
            account=account,
            priority=priority_from_headers(fields),
            body=remove_headers(raw, CONTROL_HEADERS),
            created_at=now,
            not_before=max(now, not_before or now),
            mail_options=_forwarded_options(envelope),
        )
        try:
            await self.submit(message)
        except StoreFullError as exc:
            event(log, logging.ERROR, "rejected", reason=str(exc), client=_peer(session))
            return self._reject("store_unavailable", replies.STORE_FULL)
        except StoreError as exc:
            event(log, logging.ERROR, "rejected", reason=str(exc), client=_peer(session))
            return self._reject("store_unavailable", replies.STORE_FAILED)
        self.metrics.received.inc()
        event(log, logging.INFO, "received", message.id, client=_peer(session),
              sender=f"<{message.sender}>", size=len(raw), nrcpt=len(message.recipients),
              account=account, priority=message.priority.name.lower())
        return replies.queued(message.id)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers 500 and names the exception class.
        log.exception("unexpected error in an SMTP session", exc_info=error)
        self.metrics.rejected.labels("internal_error").inc()
        return str(replies.INTERNAL_ERROR)


def _reverse_path(mail_from: str | None) -> str:
    """The envelope sender; '' for the null reverse-path (aiosmtpd reports it as '<>')."""
    return "" if mail_from in (None, "", "<>") else str(mail_from)


def _forwarded_options(envelope: Envelope) -> tuple[str, ...]:
    """MAIL options worth passing upstream: BODY=8BITMIME and SMTPUTF8."""
    keep = []
    for option in envelope.mail_options:
        upper = option.upper()
        if upper.startswith("BODY=") or upper == "SMTPUTF8":
            keep.append(upper)
    if envelope.smtp_utf8 and "SMTPUTF8" not in keep:
        keep.append("SMTPUTF8")
    return tuple(keep)


def _peer(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class RelaySMTP(SMTP):
    """aiosmtpd's server with a session gauge."""

    def __init__(self, handler: IngestHandler, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._metrics.sessions_active.inc()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._metrics.sessions_active.dec()
        super().connection_lost(exc)


async def start_listener(
    config: Config, handler: IngestHandler, metrics: Metrics
) -> asyncio.Server:
    """Bind listen.host:listen.port in the running loop (port 0: any free port)."""
    listen = config.listen
    hostname = socket.gethostname()  # once, not a getfqdn() per connection
    loop = asyncio.get_running_loop()

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            metrics,
            data_size_limit=listen.max_message_size,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="relay",
            timeout=listen.timeout,
            loop=loop,
        )

    return await loop.create_server(factory, host=listen.host, port=listen.port)
