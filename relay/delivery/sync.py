"""ack: after_upstream: which outcome of the first attempt the listener passes on
(sync_refusal, pure), and the session's side of the wait for it (SyncWaiter).

The message is committed before the attempt, so the listener may answer anything without
losing it. Only a permanent refusal of every recipient is passed on, with the upstream's
code: the client learns of it at once and no bounce is sent (it has its answer). A
delivery, a partial one, a temporary failure or no outcome in time is `250` as usual.
"""

from __future__ import annotations

import asyncio
import re

from relay.delivery.transport import SendResult
from relay.errors import DeliveryError, PermanentFailure
from relay.queue.types import AttemptResult, MessageState, RecipientState
from relay.smtp.replies import Reply

# The upstream's text goes into our reply line: printable ASCII only, one line, short
# (RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its code and CRLF).
_UNSAFE = re.compile(r"[^\x20-\x7e]+")
MAX_TEXT = 400
_ENHANCED = re.compile(r"^5\.\d{1,3}\.\d{1,3}$")


def sync_refusal(sent: SendResult | DeliveryError, result: AttemptResult) -> Reply | None:
    """The reply to give the client instead of 250, or None (answer 250)."""
    if result.state is not MessageState.FAILED:
        return None
    if any(r.state is RecipientState.DELIVERED for r in result.recipients):
        return None  # some have it: 250, the others get a bounce as usual
    if isinstance(sent, DeliveryError):
        error: DeliveryError | None = sent
    else:
        error = next(iter(sent.refused.values()), None)
    if not isinstance(error, PermanentFailure):
        return None  # failed for its age or a temporary reason: not the upstream's answer
    code = error.code if error.code is not None and 500 <= error.code <= 599 else 554
    enhanced = error.enhanced if error.enhanced and _ENHANCED.match(error.enhanced) else "5.0.0"
    text = " ".join(_UNSAFE.sub(" ", error.reason).split())[:MAX_TEXT] or "Refused upstream"
    return Reply(code, enhanced, text)


class SyncWaiter:
    """A listener session waiting for a message's first outcome (ack: after_upstream).

    ``refusing``: the outcome will be passed on as a refusal, so no bounce is queued;
    ``abandoned``: the session answered 250 without it (sync_timeout, the client left,
    shutdown), so a refusal bounces as usual. One excludes the other (set without an
    await in between). ``dedup_key``: the message's, forgotten with a refusal passed on
    (the client was told 5xx: nothing was accepted, a retry is a new submission)."""

    def __init__(self, dedup_key: str | None = None) -> None:
        self.future: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        self.refusing = False
        self.abandoned = False
        self.dedup_key = dedup_key

    def settle(self, reply: Reply | None) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def abandon(self) -> None:
        """Answer 250 now unless a refusal is already being written (it then comes in
        moments); the outcome is then handled as for any queued message."""
        if not self.refusing:
            self.abandoned = True
            self.settle(None)

    async def answer_now(self) -> Reply | None:
        """Stop waiting: None (250) at once, unless the outcome's write already took this
        waiter to pass a refusal on (no bounce then): that refusal, in moments."""
        self.abandon()
        return await self.future
