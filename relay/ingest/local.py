"""A submission without a socket: the listener's handler, driven in-process.

`relay sendmail` writes a message straight into the queue when no relay is listening.
It goes through the same handler hooks (MAIL, RCPT, DATA) as a message over SMTP, so
it gets the same checks (addresses, recipient limit, X-Account and Deferred-Delivery,
the header size) and is stored the same way; the size limit, which aiosmtpd's DATA
reader applies before the handler, is applied here. The answer is the reply line the
listener would have sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from aiosmtpd.smtp import SMTP

from relay.config.schema import Config
from relay.ingest.addresses import parse_path
from relay.ingest.handler import IngestHandler, RelayEnvelope, RelaySession
from relay.observe.metrics import unexposed_metrics
from relay.queue.store import QueueStore
from relay.smtp import replies

LOCAL_PEER = "local"  # what the handler logs as the client
# relay's hooks never read aiosmtpd's server object (the session and envelope carry all).
_NO_SERVER = cast(SMTP, None)


async def submit_local(handler: IngestHandler, sender: str, recipients: Sequence[str],
                       data: bytes, mail_options: Sequence[str] = ()) -> str:
    """Offer one message to ``handler`` as an SMTP session would; the final reply line
    (``250 2.0.0 queued as ID`` once it is committed, else the refusal)."""
    listen = handler.config.listen
    session = RelaySession(asyncio.get_running_loop())
    session.peer = LOCAL_PEER
    envelope = RelayEnvelope()
    options = list(mail_options)
    envelope.smtp_utf8 = any(o.upper() == "SMTPUTF8" for o in options)
    if listen.strict_addresses:  # as the listener parses MAIL FROM and RCPT TO
        if parse_path(f"<{sender}>" if sender else "<>") is None:
            return str(replies.BAD_SENDER_SYNTAX)
        for address in recipients:
            if parse_path(f"<{address}>") is None:
                return str(replies.BAD_RECIPIENT_SYNTAX.with_text(
                    f"Bad recipient address syntax: {address[:100]}"))
    reply = await handler.handle_MAIL(_NO_SERVER, session, envelope, sender or "<>", options)
    if not reply.startswith("2"):
        return reply
    for address in recipients:
        reply = await handler.handle_RCPT(_NO_SERVER, session, envelope, address, [])
        if not reply.startswith("2"):
            return reply
    if len(data) > listen.max_message_size:
        return str(replies.TOO_BIG)
    envelope.content = envelope.original_content = data
    return await handler.handle_DATA(_NO_SERVER, session, envelope)


def local_handler(config: Config, store: QueueStore) -> IngestHandler:
    """The listener's handler, committing straight to ``store``; its counters are counted
    nowhere (the running server's metrics are its own)."""
    return IngestHandler(config, store.enqueue, unexposed_metrics(config.accounts))
