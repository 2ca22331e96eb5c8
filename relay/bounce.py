"""RFC 3464 delivery status notifications (bounces). Pure: builds bytes, sends nothing.

A bounce goes from the null sender <> so that it can never cause a bounce of its own.
"""

from __future__ import annotations

import time
from email.message import EmailMessage, Message
from email.utils import formatdate, make_msgid

from relay.headers import header_end
from relay.message import Recipient

HEADERS_KEPT = 64 * 1024  # at most this much of the original header section is returned


def should_bounce(sender: str, failed: list[Recipient]) -> bool:
    """Never to the null sender (that is what a bounce is sent from), only for failures."""
    return bool(sender) and bool(failed)


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
    lines += [f"<{r.address}>: {r.reply}" for r in failed]
    msg.set_content("\n".join(lines) + "\n")

    # message/delivery-status is a list of header blocks: one per message, one per recipient.
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Relay-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = formatdate(arrival)
    blocks: list[Message | str] = [per_message]
    for r in failed:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {r.address}"
        block["Action"] = "failed"
        block["Status"] = _status_code(r.reply)
        block["Diagnostic-Code"] = f"smtp; {r.reply}"
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
    return report.as_bytes(policy=report.policy.clone(linesep="\r\n"))


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
