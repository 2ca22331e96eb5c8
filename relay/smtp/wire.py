"""SMTP client wire format, without I/O: commands out, replies in (RFC 5321, RFC 2920).

The upstream pool sends a whole envelope (MAIL, every RCPT, DATA) as one write when the
server offers PIPELINING, so it needs replies parsed from a byte stream that may hold
several of them, and commands built from addresses that ingest already checked.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay.smtp.data import has_bare_newline, normalize_newlines

# A reply line longer than this (RFC 5321 4.5.3.1.5 allows 512) or a multi-line reply
# with more than MAX_REPLY bytes is a broken or hostile server, not a reply.
MAX_REPLY_LINE = 8192
MAX_REPLY = 4 * MAX_REPLY_LINE
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
END_OF_DATA = b".\r\n"


class WireError(ValueError):
    """The server's bytes are not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # lines joined with "\n", without the codes

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ReplyReader:
    """Splits a byte stream into replies; keeps a partial reply until the rest arrives."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # continuation lines of the reply being read

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start:end]).rstrip(b"\r")
            start = end + 1
            if len(line) > MAX_REPLY_LINE:
                raise WireError("reply line too long")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise WireError(f"malformed reply line: {line[:80]!r}")
            self._lines.append(line)
            if line[3:4] == b"-":
                if sum(map(len, self._lines)) > MAX_REPLY:
                    raise WireError("reply too long")
                continue
            text = "\n".join(raw[4:].decode("utf-8", "replace").strip() for raw in self._lines)
            replies.append(Reply(int(line[:3]), text))
            self._lines = []
        del self._buffer[:start]
        if len(self._buffer) > MAX_REPLY_LINE:
            raise WireError("reply line too long")
        return replies


def address_literal(ip: str) -> str:
    """RFC 5321 4.1.3 address literal: '[192.0.2.1]' or '[IPv6:2001:db8::1]'."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # without an IPv6 zone (%eth0)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def command(verb: bytes, *args: bytes) -> bytes:
    """One command line; refuses CR, LF and other controls, which would inject commands."""
    line = b" ".join((verb, *args))
    if _CONTROL.search(line):
        raise ValueError("a control character in an SMTP command")
    return line + b"\r\n"


def mail_from(sender: str, options: Iterable[str], *, utf8: bool) -> bytes:
    """MAIL FROM:<sender> with options; '' is the null reverse-path <>."""
    address = sender.encode("utf-8" if utf8 else "ascii")
    return command(b"MAIL", b"FROM:<" + address + b">", *(o.encode("ascii") for o in options))


def rcpt_to(recipient: str, *, utf8: bool) -> bytes:
    return command(b"RCPT", b"TO:<" + recipient.encode("utf-8" if utf8 else "ascii") + b">")


def data_lines(body: bytes) -> list[bytes]:
    """The body as sent after 354: CRLF line ends, dot-stuffed, then the final dot.

    Ingest already stores CRLF-only bodies, so the common case only looks, and copies
    nothing; the list is written with writelines.
    """
    if has_bare_newline(body):
        body = normalize_newlines(body)
    # CRLF-only from here, so a line start is the body's start or "\r\n". bytes.replace
    # makes one copy in C; a regex substitution made a piece per match (a body of "."
    # lines: a 2 s stall of the event loop and 50 times its size in memory).
    lead = [b"."] if body.startswith(b".") else []
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    if body and not body.endswith(b"\r\n"):
        return [*lead, body, b"\r\n", END_OF_DATA]
    return [*lead, body, END_OF_DATA]
