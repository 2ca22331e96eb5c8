"""Which upstream refusals concern the account rather than the message. Pure.

A 5xx to MAIL FROM usually means "not this sender" and fails the message. Some say
instead that the *account* may not send now (a quota, missing or refused login, a sender
the account may not use): every other message would get the same answer, so failing them
all bounces a whole queue over one account problem. Those are deferred, and the account
backs off as a whole (worker.AccountWorker) until an operator or the quota resets.

The same table is consulted at every stage (MAIL, RCPT, DATA, the reply to the final
dot, a 421 closing the session): Gmail's quota comes at MAIL, RCPT or after the dot,
Microsoft 365's SubmissionQuotaExceeded after the dot.

``account_refusal`` returns a short reason label (a metric label: a fixed, small set) or
None when the reply is about the message.
"""

from __future__ import annotations

import re

QUOTA = "quota"
AUTH = "auth"
SENDER = "sender_not_allowed"
THROTTLED = "throttled"
REASONS = (QUOTA, AUTH, SENDER, THROTTLED)

# Enhanced status codes (RFC 3463, RFC 4954 section 6) that name the account.
_ENHANCED: dict[str, str] = {
    "5.4.5": QUOTA,  # Gmail: "Daily user sending quota exceeded"
    "4.4.5": QUOTA,
    "5.7.8": AUTH,  # RFC 4954: authentication credentials invalid
    "5.7.9": AUTH,  # RFC 4954: mechanism too weak
    "5.7.11": AUTH,  # RFC 4954: encryption required for requested mechanism
    "5.7.14": AUTH,  # Gmail: "please log in via your web browser"
    "5.7.3": SENDER,  # Microsoft 365: SendAsDenied (5.7.60 below)
    "5.7.60": SENDER,  # Microsoft 365: "client does not have permissions to send as this sender"
    "5.7.708": THROTTLED,  # Microsoft 365: traffic not accepted from this IP
}
# Classes that are about this message whatever the text says ("exceeded the size limit").
# 4.2.x/5.2.x name one mailbox (full, disabled, too big): about that recipient, though
# 5.2.0 (other mailbox status) is Microsoft 365's quota code and is judged by its text.
_MESSAGE_CLASSES = ("5.1.", "5.3.", "5.6.", "4.3.4", "5.3.4", "4.2.1", "4.2.2", "4.2.3",
                    "5.2.1", "5.2.2", "5.2.3", "4.2.4", "5.2.4")
# Texts about one message or recipient whatever else they say: greylisting says "try
# again later" but concerns this sender/recipient pair, not the account.
_MESSAGE_TEXTS = re.compile(r"greylist|graylist|mailbox (is )?(full|over quota)")
# A quota by name (quota_reply), as opposed to a rate limit.
_NAMED_QUOTA = re.compile(r"quota|daily|per day|today")
# Reply codes that are about the session's login, whatever the text (RFC 4954).
_CODES: dict[int, str] = {530: AUTH, 534: AUTH, 535: AUTH, 538: AUTH}
# Provider texts, lower case; the first that appears in the reply decides.
_TEXTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), reason)
    for pattern, reason in (
        (r"sending (quota|limit)", QUOTA),  # Gmail 5.4.5, Zoho, Yahoo
        # SES "454 Throttling failure: Daily message quota exceeded": a quota until its
        # window resets, though it says "throttling" (see quota_reply).
        (r"daily (message |user |sending )*(quota|limit)", QUOTA),
        (r"submissionquotaexceeded", QUOTA),  # Microsoft 365: 554 5.2.0 STOREDRV...
        (r"(message|recipient|rate) limit (exceeded|reached)", QUOTA),
        (r"too many (messages|emails|mails) (sent|today)", QUOTA),
        (r"outgoing (mail|message)s? (quota|limit)", QUOTA),
        (r"exceeded (the|your)? ?(\w+ )?(quota|limit)", QUOTA),
        (r"authentication required", AUTH),
        (r"(must|need to|please) (authenticate|log ?in|sign ?in)", AUTH),
        (r"not (logged in|authenticated)", AUTH),
        (r"sender (address )?(is )?not (allowed|authori[sz]ed|permitted)", SENDER),
        (r"not (allowed|authori[sz]ed|permitted) to send (as|from|on behalf)", SENDER),
        (r"does not have permissions? to send as", SENDER),  # Microsoft 365
        (r"sender address rejected: not owned by (auth|user)", SENDER),  # Postfix
        (r"try again later", THROTTLED),
        (r"temporarily (blocked|suspended|disabled)", THROTTLED),
        (r"account (is )?(suspended|disabled|blocked|locked)", THROTTLED),
    )
)


def account_refusal(code: int, enhanced: str | None, text: str) -> str | None:
    """The reason label when a refusal (at any stage) concerns the account, else None."""
    if code in _CODES:
        return _CODES[code]
    if code == 552 or (enhanced is not None and enhanced.startswith(_MESSAGE_CLASSES)):
        return None  # too big, bad address or content: the next message may well pass
    if enhanced is not None and enhanced in _ENHANCED:
        return _ENHANCED[enhanced]
    lowered = " ".join(text.lower().split())
    if _MESSAGE_TEXTS.search(lowered):
        return None
    for pattern, reason in _TEXTS:
        if pattern.search(lowered):
            if reason == THROTTLED and not _policy_class(enhanced):
                return None  # "451 4.3.0 try again later": the server's own trouble
            return reason
    return None


def quota_reply(code: int, enhanced: str | None, text: str) -> bool:
    """The reply names a quota (account-wide until its window resets), whatever slow-down
    words it also has: asked before relay.delivery.throttle's slow-down patterns. A rate
    ("451 4.7.1 Rate limit exceeded", SES's "Maximum sending rate exceeded") stays a
    slow-down: only a quota or a daily limit by name is one."""
    lowered = " ".join(text.lower().split())
    return (account_refusal(code, enhanced, text) == QUOTA
            and _NAMED_QUOTA.search(lowered) is not None)


def _policy_class(enhanced: str | None) -> bool:
    """A throttle is a policy (X.7.x, RFC 3463) decision; "try again later" with another
    class (4.3.0 system status) is a passing fault of the server, judged per message."""
    return enhanced is None or enhanced[2:].startswith("7.")


def login_refused(code: int, enhanced: str | None) -> bool:
    """The reply to AUTH says the credentials are wrong (RFC 4954: 535 5.7.8), as opposed
    to "454 4.7.0 temporary authentication failure" or a 421: only these count towards a
    provider's failed-login lockout, so only these get the longer auth backoff."""
    return code == 535 or enhanced == "5.7.8"
