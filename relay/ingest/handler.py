"""The listener's handler: what relay does with each SMTP command of a session (AUTH,
MAIL, RCPT, DATA), as a thin seam over the pure core: validate, parse, commit through the
``submit`` callback, answer ``250 2.0.0 queued as ID``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

from relay.config.schema import Config
from relay.delivery.priority import priority_from_headers
from relay.delivery.routing import (
    RoutingError,
    deferred_until,
    requested_account,
    without_control_headers,
)
from relay.delivery.rules import Facts, Route, decide, route
from relay.errors import StoreBusyError, StoreError, StoreFullError, StoreReserveError
from relay.ingest.addresses import recipient_key
from relay.ingest.auth import ListenerAuth
from relay.ingest.dedup import entry_key, submission_key
from relay.observe.logs import event
from relay.observe.metrics import Metrics
from relay.queue.types import Dedup, NewMessage, new_queue_id
from relay.smtp import replies
from relay.smtp.data import has_bare_newline, normalize_newlines
from relay.smtp.headers import header_section_exceeds, parse_headers

log = logging.getLogger("relay.smtpd")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Submit(Protocol):
    """Commits every message of the list in one transaction (all or none); returns the
    queue id holding each (with dedup, maybe an earlier message's) and a refusal to
    answer instead of 250 (ack: after_upstream). ``gone`` resolves when the client
    closed its side or the connection ended (nobody may be left to hear the answer)."""

    def __call__(self, messages: Sequence[NewMessage],
                 gone: asyncio.Future[None] | None = None,
                 ) -> Awaitable[tuple[list[str], replies.Reply | None]]: ...


Admit = Callable[[str], Awaitable[bool]]  # False: the account is too far behind its limit

# aiosmtpd logs this on mail.log for every session whose server requires AUTH without
# TLS. relay allows that only on loopback (config refuses it elsewhere), so each session
# would repeat a warning that does not apply: dropped here, once, and nothing else.
_AUTH_WITHOUT_TLS = "auth_required == True but auth_require_tls == False"


def _not_auth_without_tls(record: logging.LogRecord) -> bool:
    return record.getMessage() != _AUTH_WITHOUT_TLS


logging.getLogger("mail.log").addFilter(_not_auth_without_tls)


class RelaySession(Session):
    """aiosmtpd's Session without the deprecated ``login_data``: aiosmtpd itself sets it
    after every successful AUTH, and logs a deprecation warning each time. relay reads
    ``auth_data`` (the user name its authenticator returns) and never this."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        # Resolved when the client closed its side or the connection ended (listener): a
        # DATA waiting for the upstream (ack: after_upstream) stops waiting, and a
        # refusal then bounces.
        self.gone: asyncio.Future[None] = loop.create_future()

    @property
    def login_data(self) -> Any:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass


async def _always(_: str) -> bool:
    return True


# Password verifications run here, at most two at once: argon2 holds ~19 MiB per
# verification, so a burst of guesses costs bounded memory and two cores at most.
_AUTH_WORKERS: list[concurrent.futures.ThreadPoolExecutor] = []


def _auth_workers() -> concurrent.futures.ThreadPoolExecutor:
    if not _AUTH_WORKERS:
        _AUTH_WORKERS.append(concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="relay-auth"))
    return _AUTH_WORKERS[0]


class IngestHandler:
    """aiosmtpd handler hooks; each returns the SMTP reply line."""

    def __dir__(self) -> list[str]:
        # aiosmtpd scans dir(handler) on every connection for handle_*/auth_* hooks;
        # listing only those makes a new session much cheaper (docs/performance.md).
        return hook_names(type(self), ("handle_", "auth_"))

    def __init__(
        self, config: Config, submit: Submit, metrics: Metrics, admit: Admit = _always,
        auth: ListenerAuth | None = None,
    ) -> None:
        self.submit = submit
        self.admit = admit
        self.metrics = metrics
        self.accepting = True
        self.configure(config, auth)

    def configure(self, config: Config, auth: ListenerAuth | None = None) -> None:
        """Take a new config (SIGHUP): routing, accounts, limits and listener users
        (``auth``, built beforehand by a reload so that reading its files cannot fail
        half-way through the switch)."""
        self.config = config
        self.routing = config.routing.table()
        self.destinations = config.destinations  # accounts and groups
        self.auth = auth or ListenerAuth(config.listen.auth)

    def reject(self, reason: str, reply: replies.Reply) -> str:
        self.metrics.rejected.labels(reason).inc()
        return str(reply)

    async def verify_login(self, session: Session, login: LoginPassword) -> AuthResult:
        """Check a login in a worker thread: argon2 takes ~20 ms that the loop must not."""
        username = login.login.decode("utf-8", "replace")
        auth = self.auth  # the users at the time of the AUTH command, whatever a reload does
        ok = await asyncio.get_running_loop().run_in_executor(
            _auth_workers(), auth.check, username, login.password)
        if ok:
            return AuthResult(success=True, auth_data=username)
        event(log, logging.WARNING, "auth_failed", client=peer_text(session), user=username[:64])
        # handled=False: aiosmtpd answers 535 5.7.8 itself.
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not self.auth.enabled:  # aiosmtpd offers AUTH even with nobody to log in
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        # RFC 2034: our 4xx/5xx replies carry enhanced status codes.
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        utf8 = any(o.upper() == "SMTPUTF8" for o in mail_options)
        problem = _address_problem(address, allow_null=True) or _encoding_problem(address, utf8)
        if problem:
            return self.reject("bad_address", problem)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        problem = _address_problem(address, allow_null=False) or _encoding_problem(
            address, envelope.smtp_utf8
        )
        if problem:
            return self.reject("bad_address", problem)
        # The same mailbox twice is stored (and delivered) once; before the limit check,
        # so a repeat never gets a 452 that would make the client send it again.
        key = recipient_key(address)
        seen = _recipient_keys(envelope)
        if key in seen:
            return str(replies.RCPT_DUPLICATE)
        if len(envelope.rcpt_tos) >= self.config.listen.max_recipients:
            return self.reject("too_many_recipients", replies.TOO_MANY_RECIPIENTS)
        seen.add(key)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RCPT_OK)

    async def _route(self, fields: list[tuple[str, str]], envelope: Envelope,
                     user: str | None) -> tuple[list[Route], float | None] | str:
        """The routes (X-Account, else routing.rules per recipient, else the default) and
        any Deferred-Delivery time, or the refusal to answer: each step says which it was,
        not its message text. The user must be allowed every account it ends on."""
        try:
            requested = requested_account(fields, self.destinations)
        except RoutingError as exc:
            return self.reject("unknown_account", replies.UNKNOWN_ACCOUNT.with_text(str(exc)))
        facts = Facts(_reverse_path(envelope.mail_from), tuple(envelope.rcpt_tos), fields, user)
        routes = route(decide(facts, self.routing, requested))
        try:
            not_before = deferred_until(fields)
        except RoutingError as exc:
            return self.reject("bad_header", replies.BAD_HEADER.with_text(str(exc)))
        if not all(self.auth.may_use(user, r.account) for r in routes):
            return self.reject("access_denied", replies.ACCOUNT_NOT_ALLOWED)
        for r in routes:
            if not await self.admit(r.account):
                return self.reject("rate_limited", replies.RATE_LIMITED)
        return routes, not_before

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.accepting:
            return str(replies.SHUTTING_DOWN)
        raw = envelope.original_content or b""
        if has_bare_newline(raw):
            if self.config.listen.bare_newlines == "reject":
                return self.reject("bare_newline", replies.BARE_NEWLINE)
            raw = normalize_newlines(raw)
        limit = self.config.listen.max_header_size
        if header_section_exceeds(raw, limit):
            return self.reject("header_too_big", replies.HEADER_TOO_BIG.with_text(
                f"Header section exceeds {limit} bytes"))
        fields = parse_headers(raw)
        user = session.auth_data if session.authenticated else None
        routed = await self._route(fields, envelope, user)
        if isinstance(routed, str):
            return routed
        routes, not_before = routed
        now = time.time()
        sender = _reverse_path(envelope.mail_from)
        body = without_control_headers(raw, fields)
        split = len(routes) > 1
        # What belongs to the whole message, once; then one queue entry per account, all
        # committed together before the one 250.
        priority, options = priority_from_headers(fields), _forwarded_options(envelope)
        submission = self._submission(fields, sender, envelope.rcpt_tos, user)
        messages = [NewMessage(
            id=new_queue_id(),
            sender=sender,
            recipients=r.recipients,
            account=r.account,
            priority=priority,
            body=body,
            created_at=now,
            not_before=max(now, not_before or now),
            mail_options=options,
            # Each entry's key: the whole submission and the entry's account.
            dedup=None if submission is None else Dedup(entry_key(submission[0], r.account),
                                                        submission[1]),
        ) for r in routes]
        try:
            gone = session.gone if isinstance(session, RelaySession) else None
            queued, refusal = await self.submit(messages, gone)
        except StoreError as exc:
            return self._not_stored(exc, session)
        fresh = [m for m, holder in zip(messages, queued, strict=True) if holder == m.id]
        for m, holder in zip(messages, queued, strict=True):
            if holder != m.id:  # accepted before: the client is told the first id again
                self.metrics.deduplicated.inc()
                event(log, logging.INFO, "deduplicated", holder, duplicate=m.id,
                      client=peer_text(session), sender=f"<{m.sender}>")
        if fresh:
            self.metrics.received.inc()  # one per 250, however many queue entries
        for message in fresh:
            event(log, logging.INFO, "received", message.id, client=peer_text(session),
                  sender=f"<{message.sender}>", size=len(raw), nrcpt=len(message.recipients),
                  account=message.account, priority=message.priority.name.lower(),
                  split=len(messages) if split else None)
        if refusal is not None:  # recorded failed, without a bounce: this is the answer
            event(log, logging.INFO, "refused_upstream", messages[0].id, reply=str(refusal))
            return self.reject("upstream_refused", refusal)
        return replies.queued(" ".join(queued))

    def _not_stored(self, exc: StoreError, session: Session) -> str:
        """The reply when the message could not be committed (the client keeps it)."""
        if isinstance(exc, StoreBusyError):  # other workers held the write lock too long
            event(log, logging.WARNING, "rejected", reason=str(exc), client=peer_text(session))
            return self.reject("queue_busy", replies.STORE_BUSY)
        if isinstance(exc, StoreReserveError):  # refused before the disk fills
            event(log, logging.WARNING, "rejected", reason=str(exc), client=peer_text(session))
            return self.reject("low_disk", replies.STORE_FULL)
        event(log, logging.ERROR, "rejected", reason=str(exc), client=peer_text(session))
        if isinstance(exc, StoreFullError):
            return self.reject("store_unavailable", replies.STORE_FULL)
        return self.reject("store_unavailable", replies.STORE_FAILED)

    def _submission(self, fields: list[tuple[str, str]], sender: str, recipients: list[str],
                    user: str | None) -> tuple[str, float] | None:
        """With dedup on: the submission's key and the window (None: no dedup)."""
        window = self.config.dedup.window if self.config.dedup is not None else None
        if window is None:
            return None
        key = submission_key(fields, sender, recipients, user)
        return None if key is None else (key, window)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers 500 and names the exception class.
        log.exception("unexpected error in an SMTP session", exc_info=error)
        self.metrics.rejected.labels("internal_error").inc()
        return str(replies.INTERNAL_ERROR)


# RFC 5321 4.5.3.1.1 and 4.5.3.1.3: local part at most 64 octets, path at most 256 (so an
# address at most 254).
MAX_LOCAL_PART, MAX_ADDRESS = 64, 254


def _address_problem(address: str, *, allow_null: bool) -> replies.Reply | None:
    bad = replies.BAD_ADDRESS
    if address in ("", "<>"):
        return None if allow_null else bad.with_text("Null recipient not allowed")
    if not allow_null and address.lower() == "postmaster":  # RFC 5321 4.1.1.3: <Postmaster>
        return None
    octets = address.encode("utf-8", "surrogateescape")
    if len(octets) > MAX_ADDRESS:
        return bad.with_text(f"Address longer than {MAX_ADDRESS} octets")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return bad.with_text("Address must be local-part@domain")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        return bad.with_text(f"Local part longer than {MAX_LOCAL_PART} octets")
    if CONTROL.search(address):  # RFC 5321 4.1.2: no control characters in a mailbox
        return bad.with_text("Address contains control characters")
    # Outside quotes in the local part, and outside an address literal's brackets in the
    # domain (RFC 5321 4.1.3: a@[127.0.0.1], a@[IPv6:::1]; the parser checked its form).
    literal = domain.startswith("[") and domain.endswith("]")
    if (not local.startswith('"') and _has_special(local)) or (
            not literal and _has_special(domain)):
        return bad.with_text("Address contains characters not allowed outside quotes")
    return None


def _has_special(text: str) -> bool:
    return any(c in text for c in " <>()[],;\\\"")


def _encoding_problem(address: str, smtputf8: bool) -> replies.Reply | None:
    """RFC 6531 3.4: non-ASCII addresses only with SMTPUTF8, and only as valid UTF-8."""
    if address.isascii():
        return None
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # aiosmtpd keeps undecodable bytes as lone surrogates
        return replies.NOT_UTF8_ADDRESS
    return None if smtputf8 else replies.NEEDS_SMTPUTF8


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the recipients' mailbox keys, to find repeats in O(1)."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_keys: set[str] = set()


def _recipient_keys(envelope: Envelope) -> set[str]:
    if isinstance(envelope, RelayEnvelope):
        return envelope.rcpt_keys
    return {recipient_key(a) for a in envelope.rcpt_tos}


def _reverse_path(mail_from: str | None) -> str:
    """The envelope sender; '' for the null reverse-path (aiosmtpd reports it as '<>')."""
    return "" if mail_from in (None, "", "<>") else str(mail_from)


_HOOK_NAMES: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of cls with these prefixes, computed once per class."""
    key = (cls.__qualname__, prefixes)
    if key not in _HOOK_NAMES:
        _HOOK_NAMES[key] = sorted(name for name in dir(cls) if name.startswith(prefixes))
    return _HOOK_NAMES[key]


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


def peer_text(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
