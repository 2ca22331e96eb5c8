"""Upstream replies and errors as relay's: the one place aiosmtplib's exceptions and the
channel's replies become TemporaryFailure / PermanentFailure (by reply code, by base
class, per recipient), and where a MAIL FROM refusal is judged about the account.
"""

from __future__ import annotations

import re
import socket
import ssl

import aiosmtplib

from relay.delivery.refusals import THROTTLED, account_refusal, login_refused
from relay.delivery.throttle import slow_down_reply
from relay.errors import DeliveryError, PermanentFailure, TemporaryFailure
from relay.smtp.wire import Reply

ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


def split_enhanced(text: str) -> tuple[str | None, str]:
    match = ENHANCED.match(text)
    if match:
        return match.group(1), text[match.end() :]
    return None, text


def map_smtp_error(exc: BaseException, *, connecting: bool = False) -> DeliveryError:
    """Translate an aiosmtplib or socket error: 4xx/timeouts/disconnects are temporary."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        enhanced, text = split_enhanced(exc.message)
        account_wide = connecting or isinstance(
            exc, aiosmtplib.SMTPAuthenticationError | aiosmtplib.SMTPConnectResponseError
        )
        reason = None
        if account_wide:
            auth = isinstance(exc, aiosmtplib.SMTPAuthenticationError)
            if auth and login_refused(exc.code, enhanced):
                reason = "auth"
            else:  # a 454/421 to AUTH is the server's trouble: the ordinary backoff
                reason = account_refusal(exc.code, enhanced, text)
                reason = "refused" if reason in (None, "auth") else reason
        cls = PermanentFailure if 500 <= exc.code < 600 and not account_wide else TemporaryFailure
        return cls(text or "no text", code=exc.code, enhanced=enhanced, account_wide=account_wide,
                   account_reason=reason)
    if isinstance(exc, ssl.SSLError):
        return TemporaryFailure(f"TLS failure: {exc.reason or exc}", account_wide=True)
    # aiosmtplib wraps a failed DNS lookup in its own connect error; look at the cause.
    cause = exc if isinstance(exc, socket.gaierror) else exc.__cause__
    if isinstance(cause, socket.gaierror):
        return TemporaryFailure(f"DNS lookup failed: {cause.strerror}", account_wide=True)
    if isinstance(exc, TimeoutError):
        return TemporaryFailure("timed out waiting for the upstream", account_wide=connecting)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return TemporaryFailure(f"upstream lacks a required extension: {exc}", account_wide=True)
    if isinstance(exc, ConnectionError | OSError | aiosmtplib.SMTPException):
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return TemporaryFailure(f"connection failed: {text}", account_wide=connecting)
    return TemporaryFailure(f"unexpected error: {type(exc).__name__}")


class ChannelClosed(ConnectionError):
    """The connection ended, or the server broke the protocol, before the reply came."""


class ServiceClosing(ChannelClosed):
    """The server answered 421: RFC 5321 3.8, it is closing the session, whatever it does."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def closing_error(exc: ServiceClosing) -> DeliveryError:
    """A 421 as the message's temporary failure, the server's text kept for the log.

    A 421 whose text is a throttle or quota (Gmail's "4.7.0 Try again later, closing
    connection") is about the account: it backs off. A plain 421 (Exim's "too many
    messages in this connection") is about this connection: see ``account_wide``. A
    slow-down 421 ("4.7.0 Try again in 20 seconds", Gmail's "4.7.28 ... rate limited") is
    an account-wide throttle too: resending at once on a fresh connection would only add
    to the rate it complained of."""
    enhanced, text = split_enhanced(exc.reply.text)
    reason = account_refusal(421, enhanced, text)
    if reason is None and slow_down_reply(421, enhanced, text):
        reason = THROTTLED
    return TemporaryFailure(text or "service closing", code=421, enhanced=enhanced,
                            account_reason=reason)


def too_many_recipients(error: DeliveryError) -> bool:
    """RFC 5321 4.5.3.1.10: '452 too many recipients' (552 from older servers, which the
    RFC says to treat as temporary) means 'send the rest in another transaction'."""
    return error.code in (452, 552) and (
        error.enhanced in ("4.5.3", "5.5.3") or "too many recipients" in error.reason.lower()
    )


def refusal(reply: Reply, what: str) -> DeliveryError:
    """A refused command (MAIL, RCPT, DATA, the final dot): about the account (a quota,
    a throttle, a login: deferred, and the account backs off whatever the code) or about
    the message (5xx fails it, 4xx retries it)."""
    enhanced, text = split_enhanced(reply.text)
    error = TemporaryFailure(text or f"{what} refused", code=reply.code, enhanced=enhanced)
    if too_many_recipients(error):  # "452 4.5.3 recipient limit exceeded": send the rest
        return error
    reason = account_refusal(reply.code, enhanced, text)
    if reason is not None:
        return TemporaryFailure(error.reason, code=reply.code, enhanced=enhanced,
                                account_reason=reason)
    if 500 <= reply.code < 600:
        return PermanentFailure(error.reason, code=reply.code, enhanced=enhanced)
    return error


def sender_refusal(reply: Reply) -> DeliveryError:
    """MAIL FROM refused: about the account (quota, login: defer, back off) or the message."""
    return refusal(reply, "sender")
