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

from relay.config.schema import Config, ListenAuthConfig, ListenUserConfig
from relay.ingest.addresses import parse_path
from relay.ingest.auth import ListenerAuth
from relay.ingest.handler import IngestHandler, RelayEnvelope, RelaySession
from relay.observe.metrics import unexposed_metrics
from relay.queue.store import QueueStore
from relay.queue.types import NewMessage
from relay.smtp import replies

LOCAL_PEER = "local"  # what the handler logs as the client
# relay's hooks never read aiosmtpd's server object (the session and envelope carry all).
_NO_SERVER = cast(SMTP, None)


async def submit_local(handler: IngestHandler, sender: str, recipients: Sequence[str],
                       data: bytes, mail_options: Sequence[str] = (),
                       user: str | None = None) -> str:
    """Offer one message to ``handler`` as an SMTP session would; the final reply line
    (``250 2.0.0 queued as ID`` once it is committed, else the refusal). ``user``: the
    listener user the session counts as logged in as (see ``local_handler``)."""
    listen = handler.config.listen
    session = RelaySession(asyncio.get_running_loop())
    session.peer = LOCAL_PEER
    if user is not None:
        session.authenticated = True
        session.auth_data = user  # type: ignore[assignment]  # (typed None until a login)
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


def local_handler(config: Config, store: QueueStore, user: str | None = None
                  ) -> IngestHandler:
    """The listener's handler, committing straight to ``store``; its counters are counted
    nowhere (the running server's metrics are its own).

    It reads no password: with ``listen.auth``, ``user`` (a listener user) counts as
    logged in, and the listener's rules for which accounts a user may send through
    apply. Whoever can write the queue file needs no password to add to it.
    """
    auth = config.listen.auth
    spec = auth.users.get(user) if user is not None else None
    users = {} if spec is None or user is None else {
        user: ListenUserConfig.model_construct(accounts=spec.accounts)}  # no secret
    rules = ListenerAuth(ListenAuthConfig.model_construct(required=auth.required,
                                                          users=users))

    async def commit(messages: Sequence[NewMessage],
                     gone: asyncio.Future[None] | None = None) -> tuple[list[str], None]:
        """As the server commits (all of a split message in one transaction), but never
        tried at once (ack: after_upstream needs a running relay)."""
        if len(messages) == 1:
            return [await store.enqueue(messages[0])], None
        return await store.enqueue_all(messages), None

    return IngestHandler(config, commit, unexposed_metrics(config.accounts), auth=rules)
