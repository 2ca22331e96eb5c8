"""Sender rewriting for strict upstreams (``accounts.NAME.rewrite``), opt-in. Pure.

Outlook and Gmail (without a verified alias) refuse mail whose From is not the account
that logged in. An account may send with another envelope sender, put it in the From
header too, and keep the original From as Reply-To so that answers still reach it.
Changing From breaks a DKIM signature the application made over it (docs/routing.md);
nothing is rewritten unless the account asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.smtp.headers import raw_header, remove_headers


@dataclass(frozen=True)
class Rewrite:
    envelope_from: str | None = None  # None: the message's own envelope sender
    replace_header_from: bool = False  # From: its address becomes envelope_from
    reply_to_original: bool = False  # Reply-To: the original From, unless one is set

    def apply(self, sender: str, body: bytes) -> tuple[str, bytes]:
        """The envelope sender and message to send. The null sender (a bounce) stays
        null: RFC 5321 4.5.5, a bounce must not cause another."""
        if sender and self.envelope_from:
            sender = self.envelope_from
        if not self.replace_header_from or not self.envelope_from:
            return sender, body
        original = raw_header(body, "From")
        added = [b"From: " + _with_address(original, self.envelope_from) + b"\r\n"]
        if (self.reply_to_original and original
                and raw_header(body, "Reply-To") is None):
            added.append(b"Reply-To: " + original + b"\r\n")
        return sender, b"".join(added) + remove_headers(body, {"From"})


def rewritten(rewrite: Rewrite | None, sender: str, body: bytes) -> tuple[str, bytes]:
    """What an account with ``rewrite`` (None: none configured) sends for a message."""
    return (sender, body) if rewrite is None else rewrite.apply(sender, body)


def _with_address(value: bytes | None, address: str) -> bytes:
    """``value`` (a From field's) with its address replaced, its display name kept:
    ``"Shop" <news@brand.example>`` -> ``"Shop" <noreply@example.com>``."""
    new = address.encode("utf-8")
    if value is None:
        return new
    start, end = value.rfind(b"<"), value.rfind(b">")
    if value.count(b"<") == 1 and 0 <= start < end:
        return value[: start + 1] + new + value[end:]
    return new  # a bare address (or several): the new one alone
