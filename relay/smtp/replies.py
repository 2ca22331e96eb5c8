"""SMTP replies the listener sends, named, so the listener and its tests share them.

Codes and enhanced codes: RFC 5321 section 4.2, RFC 3463.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


def queued(queue_id: str) -> str:
    return f"250 2.0.0 queued as {queue_id}"


OK = Reply(250, "2.1.0", "OK")
RCPT_OK = Reply(250, "2.1.5", "OK")
RCPT_DUPLICATE = Reply(250, "2.1.5", "OK (duplicate recipient: it gets one copy)")
# Local errors: the client keeps the message and retries.
STORE_FAILED = Reply(451, "4.3.0", "Queue unavailable, try again later")
STORE_BUSY = Reply(451, "4.3.0", "Queue busy, try again later")
STORE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RATE_LIMITED = Reply(451, "4.7.1", "Account over its rate limit, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")
# The message can never be accepted as it is.
UNKNOWN_ACCOUNT = Reply(550, "5.7.1", "X-Account header names an unknown account")
BAD_HEADER = Reply(550, "5.6.0", "Malformed header")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# Refused, not cut (Postfix cuts at header_size_limit): a cut header breaks signatures.
HEADER_TOO_BIG = Reply(552, "5.3.4", "Header section too large")
BAD_ADDRESS = Reply(553, "5.1.3", "Malformed address")
# RFC 5321 4.1.2 path syntax (Postfix's wording); RFC 3463: 5.1.7 sender, 5.1.3 recipient.
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
# RFC 6531 3.4 / RFC 6533: non-ASCII mailboxes.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
NOT_UTF8_ADDRESS = Reply(553, "5.6.7", "Address is not valid UTF-8")
# Postfix's smtpd_forbid_bare_newline answer: a bare LF/CR could smuggle a second message.
BARE_NEWLINE = Reply(550, "5.5.2", "Bare <LF> or <CR> in message data, use <CRLF>")
ACCOUNT_NOT_ALLOWED = Reply(550, "5.7.1", "This user may not send through that account")
