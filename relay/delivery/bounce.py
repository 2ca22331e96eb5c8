"""RFC 3464 delivery status notifications (bounces). Pure: builds bytes, sends nothing.

A bounce goes from the null sender <> so that it can never cause a bounce of its own.
Everything that came from outside (addresses, upstream replies) is made one line of
printable ASCII before it goes into a header: an upstream reply can never add a header.
"""

from __future__ import annotations

import time
from email import policy
from email.message import EmailMessage, Message
from email.utils import formatdate, make_msgid

from relay.queue.types import Recipient
from relay.smtp.headers import header_end

HEADERS_KEPT = 64 * 1024  # at most this much of the original header section is returned
FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters


def should_bounce(sender: str, failed: list[Recipient]) -> bool:
    """Only for failures, never to the null sender: a bounce is sent from <>, so this is
    also what keeps a bounce that fails from causing another."""
    return bool(sender) and bool(failed)


def needs_smtputf8(sender: str) -> bool:
    """A bounce to a non-ASCII address must go with SMTPUTF8 (RFC 6531)."""
    return not sender.isascii()


def _xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: printable ASCII as is, anything else as \\x{HEX}."""
    return "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
        for c in address
    )


def final_recipient(address: str) -> str:
    """Final-Recipient value: 'rfc822; a@b', or RFC 6533 'utf-8; ' form when not ASCII."""
    if all(0x21 <= ord(c) <= 0x7E for c in address):
        return f"rfc822; {address}"
    return f"utf-8; {_xtext(address)}"


def one_line(text: str) -> str:
    """A reply as one line: the lines of a multi-line reply joined by spaces, control
    characters dropped (CR, LF, ESC: no header or terminal injection)."""
    words = "".join(c if c.isprintable() else " " for c in text).split()
    return " ".join(words)


def diagnostic_code(reply: str) -> str:
    """Diagnostic-Code value (RFC 3464 2.3.6): 'smtp; ' and the reply in ASCII, folded
    at spaces (RFC 5322 2.2.3) so that a long reply stays one field."""
    text = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in one_line(reply))
    return _fold("smtp; " + text, len("Diagnostic-Code: "))


def _fold(value: str, used: int) -> str:
    lines: list[str] = []
    line = ""
    for word in value.split(" "):
        if line and used + len(line) + 1 + len(word) > FOLD_AT:
            lines.append(line)
            line, used = word, 1  # a continuation line starts with one space
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n ".join(lines)


def build_dsn(
    *,
    queue_id: str,
    sender: str,
    failed: list[Recipient],
    original: bytes,
    reporting_mta: str,
    arrival: float,
    now: float | None = None,
) -> bytes:
    """A multipart/report; report-type=delivery-status message for the failed recipients."""
    now = time.time() if now is None else now
    msg = EmailMessage()
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    msg["To"] = sender
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = formatdate(now)
    msg["Message-ID"] = make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834
    lines = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"Queue ID: {queue_id}",
        "",
    ]
    lines += [f"<{one_line(r.address)}>: {one_line(r.reply)}" for r in failed]
    msg.set_content("\n".join(lines) + "\n")

    # message/delivery-status is a list of header blocks: one per message, one per recipient.
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Relay-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = formatdate(arrival)
    blocks: list[Message | str] = [per_message]
    for r in failed:
        block = Message()
        block["Final-Recipient"] = final_recipient(r.address)
        block["Action"] = "failed"
        block["Status"] = _status_code(r.reply)
        block["Diagnostic-Code"] = diagnostic_code(r.reply)
        blocks.append(block)
    status = Message()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(blocks)
    headers = original[: min(header_end(original), HEADERS_KEPT)]
    returned = EmailMessage()
    returned.set_content(headers.decode("utf-8", "replace"), subtype="rfc822-headers")

    report = EmailMessage()
    for key in ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted"):
        report[key] = msg[key]
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    report.attach(_part(msg))
    report.attach(status)  # type: ignore[arg-type]
    report.attach(returned)
    # A non-ASCII sender gets raw UTF-8 in To (RFC 6532), sent with SMTPUTF8.
    # Fields are folded here; the generator must not refold them (it would turn a long
    # xtext address into RFC 2047 encoded-words, which a DSN reader does not decode).
    out = policy.SMTPUTF8 if needs_smtputf8(sender) else policy.SMTP
    return report.as_bytes(policy=out.clone(max_line_length=998))


def _part(msg: EmailMessage) -> EmailMessage:
    part = EmailMessage()
    part.set_content(msg.get_content())
    return part


def _status_code(reply: str) -> str:
    """The enhanced status code in a reply ('550 5.1.1 no user' -> '5.1.1'), else 5.0.0."""
    for word in reply.split()[:3]:
        parts = word.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "45":
            return "5" + word[1:] if word.startswith("4") else word
    return "5.0.0"
