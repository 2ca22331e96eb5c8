"""Envelope addresses (RFC 5321 4.1.2): path syntax, and when two are the same mailbox.

Pure: the listener asks, nothing here reads a socket.
"""

from __future__ import annotations

import ipaddress
import re


def recipient_key(address: str) -> str:
    """The mailbox an address names, for finding duplicates in one envelope.

    RFC 5321 2.4: the domain is case-insensitive, the local part may not be (only the
    receiving host can say), so the local part is compared as given, except for quoting
    that changes nothing (RFC 5321 4.1.2: ``"r"`` and ``r`` are the same local part).
    An internationalised domain and its A-label form (IDNA) are the same domain.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{_local_key(local)}@{_domain_key(domain)}"


_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _local_key(local: str) -> str:
    """A quoted local part without its quotes when it needs none, else canonically quoted."""
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return local
    text = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _domain_key(domain: str) -> str:
    """Lower case, and IDNA labels in their A-label (xn--) form: one spelling per domain."""
    lowered = domain.lower()
    if lowered.startswith("[") or lowered.isascii():
        return lowered
    try:
        return lowered.encode("idna").decode("ascii")
    except UnicodeError:  # not a valid IDN: compared as given (lower case)
        return lowered


# RFC 5321 4.1.2, with RFC 6531 3.3's UTF-8 in atoms, quoted strings and domain labels
# (whether a non-ASCII path is allowed, SMTPUTF8, is the listener's check, not syntax's).
# Lone surrogates (undecodable bytes kept by surrogateescape) parse as UTF-8 here too, and
# get the listener's "not valid UTF-8" answer.
_UTF8 = "\u0080-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]+"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")  # a local part that needs no quotes
_LABEL = rf"[A-Za-z0-9{_UTF8}][A-Za-z0-9\-{_UTF8}]*(?<!-)"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_PATH = re.compile(
    rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?"  # a source route: accepted and ignored (C.2)
    rf"((?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})@(?:{_DOMAIN}|\[([^\[\]\\\x00-\x20\x7f]*)\]))>"
    r"(?: (.*))?",
    re.DOTALL,
)
_IPV4 = re.compile(r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")
_GENERAL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+")


def parse_path(arg: str) -> tuple[str, str] | None:
    """(mailbox, parameters) from a MAIL FROM/RCPT TO argument; None if malformed.

    ``Path = "<" [ A-d-l ":" ] Mailbox ">"``, then nothing or a space and the parameters.
    The null path ``<>`` comes back as ``"<>"`` (as aiosmtpd reports it).
    """
    arg = arg.lstrip(" ")
    if arg == "<>" or arg.startswith("<> "):
        return "<>", arg[3:].lstrip(" ")
    match = _PATH.fullmatch(arg)
    if match is None:
        return None
    literal = match.group(2)
    if literal is not None and not _valid_literal(literal):
        return None
    return match.group(1), (match.group(3) or "").lstrip(" ")


def _valid_literal(text: str) -> bool:
    """RFC 5321 4.1.3 address literals: IPv4, "IPv6:" and an IPv6 address, or tag:content."""
    if text[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(text[5:])
        except ValueError:
            return False
        return True
    return bool(_IPV4.fullmatch(text) or _GENERAL.fullmatch(text))
