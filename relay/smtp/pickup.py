"""A message handed to sendmail, made ready to submit: what Postfix's sendmail, pickup and
cleanup do to local mail before it is queued.

- The input is lines ending in LF (or CRLF; a lone CR is a space); a line that is a
  lone ``.`` ends it unless ``-i``; a leading mbox ``From `` line is dropped. Lines
  become CRLF lines, and a line over 998 octets (RFC 5321 4.5.3.1.6) is broken, as
  Postfix's smtp client does (folded with a space in the header section, so it stays one field).
- ``-t``: recipients also from To, Cc and Bcc (from Resent-To, Resent-Cc and Resent-Bcc
  instead when the message has any, as sendmail does). Bcc and Resent-Bcc fields are
  removed always: they must not reach the other recipients (RFC 5322 3.6.3).
- A missing From (``-F``'s name, the sender's address), Date and Message-ID are added at
  the end of the header section, as Postfix's cleanup does.
- An address without ``@domain`` (``root``, cron's default MAILTO) gets ``@domain``; a
  local recipient goes to ``admin_address`` instead when one is set (nullmailer's
  adminaddr).

Pure: time, the Message-ID and the login name come in as arguments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader, HeaderRegistry
from email.utils import formataddr, getaddresses
from typing import cast

from relay.smtp.headers import parse_headers

MAX_LINE = 998  # RFC 5321 4.5.3.1.6: 1000 octets with the CRLF
# Only LF (or CRLF) ends a line, as with Postfix; a lone CR is no line end (it would
# start a header field a reader of the raw bytes never sees), and becomes a space.
_NEWLINE = re.compile(rb"\r?\n")
_LONE_CR = re.compile(rb"\r")
_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 2.2
_MBOX_FROM = re.compile(rb"^>*From ")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
RECIPIENT_FIELDS = ("to", "cc", "bcc")
RESENT_FIELDS = ("resent-to", "resent-cc", "resent-bcc")
_REMOVED = frozenset({"bcc", "resent-bcc"})
_REGISTRY = HeaderRegistry()


class NoRecipients(ValueError):
    """Nothing to send to (EX_USAGE)."""


class BadAddress(ValueError):
    """A command-line recipient that holds no address (EX_DATAERR)."""


@dataclass(frozen=True)
class Prepared:
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    data: bytes  # CRLF lines, each at most 998 octets, the last one ending in CRLF


@dataclass(frozen=True)
class Local:
    """What the submitting side knows that the message does not."""

    login: str  # the user running sendmail: the default sender's local part
    domain: str  # for addresses without one (sendmail.domain, else the host name)
    date: str  # an RFC 5322 date for a missing Date
    message_id: str  # "<...>" for a missing Message-ID
    full_name: str | None = None  # -F, else the user's name
    admin_address: str | None = None  # where mail to local users goes, if set


def input_lines(raw: bytes, *, dots_end_input: bool) -> list[bytes]:
    """Standard input as lines without their line ends, up to a lone dot (unless -i)."""
    lines = [_LONE_CR.sub(b" ", line) for line in _NEWLINE.split(raw)]
    if lines and lines[-1] == b"":  # the newline that ends the last line
        lines.pop()
    while lines and _MBOX_FROM.match(lines[0]):  # an mbox separator, not a header
        lines.pop(0)
    if dots_end_input and b"." in lines:
        del lines[lines.index(b"."):]
    return lines


def split_header(lines: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(header lines, body lines): the header section ends at the blank line (dropped
    here) or at the first line that is neither a field nor a folded continuation."""
    for n, line in enumerate(lines):
        if line == b"":
            return lines[:n], lines[n + 1:]
        if not (_FIELD.match(line) or (n and line.startswith((b" ", b"\t")))):
            return lines[:n], lines[n:]
    return lines, []


def recipients_in(fields: Sequence[tuple[str, str]]) -> list[str]:
    """The addresses -t takes: Resent-To/Cc/Bcc if any, else To/Cc/Bcc (groups and
    display names read as RFC 5322 says; an empty group gives none)."""
    names = {name.lower() for name, _ in fields}
    wanted = RESENT_FIELDS if names & set(RESENT_FIELDS) else RECIPIENT_FIELDS
    values = [value for name, value in fields if name.lower() in wanted]
    return [address for value in values for address in addresses_in(value)]


def addresses_in(value: str) -> list[str]:
    """The addresses of an address list (a field's value, or a command-line argument),
    parsed strictly: BadAddress where email.utils and email.headerregistry read it
    differently (``a@example.org)<evil@example.com>`` is one address to one and two to
    the other: a recipient smuggled in). Groups and display names as RFC 5322 says."""
    loose = [address for _, address in getaddresses([value]) if address]
    try:
        field = cast(AddressHeader, _REGISTRY("to", value))
        strict = [a.addr_spec for a in field.addresses if a.addr_spec.strip("<>")]
    except (HeaderParseError, ValueError, IndexError, AttributeError):
        strict = []
    if [a.strip("<>") for a in strict] != loose:
        raise BadAddress(f"bad address list {value[:200]!r}: it reads as more than one"
                         " thing")
    return loose


def qualify(address: str, local: Local, *, recipient: bool) -> str:
    """``address`` with ``@domain`` when it has none (a recipient: the admin address, if
    set); the null sender stays null."""
    if "@" in address or address in ("", "<>"):
        return "" if address == "<>" else address
    if recipient and local.admin_address:
        return local.admin_address
    return f"{address}@{local.domain}"


def prepare(lines: list[bytes], *, sender: str | None, arguments: Sequence[str],
            extract: bool, local: Local, sender_from_header: bool = False) -> Prepared:
    """The envelope and the bytes to submit for the input ``lines``.

    ``arguments``: the command line's recipients, each possibly a list
    (``"a@x, Bob <b@y>"``, as mail programs pass them). NoRecipients if none remain.
    ``sender_from_header``: without ``sender``, the From field's address is the sender.
    """
    header, body = split_header(lines)
    fields = parse_headers(b"\r\n".join(header) + b"\r\n\r\n") if header else []
    found: list[str] = []
    for argument in arguments:
        try:
            addresses = addresses_in(argument)
        except BadAddress:
            addresses = []
        if not addresses:
            raise BadAddress(f"bad recipient address {argument!r}")
        found += addresses
    if extract:
        found += recipients_in(fields)
    recipients = tuple(dict.fromkeys(qualify(a, local, recipient=True) for a in found))
    if not recipients:
        raise NoRecipients("no recipients: give them as arguments, or use -t with To, Cc"
                           " or Bcc fields in the message")
    if sender is None and sender_from_header:
        sender = next((value for name, value in fields if name.lower() == "from"), None)
    envelope_sender = qualify(_sender_address(sender) if sender is not None else local.login,
                              local, recipient=False)
    header = _without(header, _REMOVED)
    present = {name.lower() for name, _ in fields}
    if "from" not in present:
        address = envelope_sender or f"{local.login}@{local.domain}"
        # A control character in -F's name (or the passwd entry's) must not end the field.
        name = _CONTROL.sub(" ", local.full_name or "").strip()
        header.append(b"From: " + _mailbox(name, address))
    if "date" not in present:
        header.append(b"Date: " + local.date.encode())
    if "message-id" not in present:
        header.append(b"Message-ID: " + local.message_id.encode())
    out = [*_broken(header, b" "), b"", *_broken(body, b"")]
    return Prepared(envelope_sender, recipients, b"\r\n".join(out) + b"\r\n")


def _mailbox(name: str, address: str) -> bytes:
    """``name <address>``: a name beyond ASCII as an RFC 2047 encoded word (formataddr
    does that), an address beyond ASCII as UTF-8 (RFC 6532: the message goes with
    SMTPUTF8, which such an envelope needs anyway)."""
    if address.isascii():
        return formataddr((name, address)).encode()
    stand_in = "x@x.invalid"
    return formataddr((name, stand_in)).replace(stand_in, address).encode("utf-8")


def _sender_address(sender: str) -> str:
    """-f's address: ``Bob <bob@example.com>`` gives ``bob@example.com`` (as Postfix takes
    the first address of -f); ``<>`` and ``""`` stay the null sender."""
    if sender in ("", "<>"):
        return sender
    addresses = [address for _, address in getaddresses([sender]) if address]
    return addresses[0] if addresses else sender


def _without(header: list[bytes], names: frozenset[str]) -> list[bytes]:
    """The header lines without the fields named (and their continuation lines)."""
    kept: list[bytes] = []
    dropping = False
    for line in header:
        if line.startswith((b" ", b"\t")):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        dropping = name in names
        if not dropping:
            kept.append(line)
    return kept


def _broken(lines: list[bytes], lead: bytes) -> list[bytes]:
    """Each line over MAX_LINE octets broken into pieces that fit; every piece after the
    first starts with ``lead`` (a space folds a header field, RFC 5322 2.2.3)."""
    out: list[bytes] = []
    for line in lines:
        if len(line) <= MAX_LINE:
            out.append(line)
            continue
        out.append(line[:MAX_LINE])
        step = MAX_LINE - len(lead)
        out += [lead + line[k:k + step] for k in range(MAX_LINE, len(line), step)]
    return out
