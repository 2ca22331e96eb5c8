"""Idempotent submission's key: which submissions are "the same message" (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from relay.ingest.addresses import recipient_key
from relay.smtp.headers import message_id_of


def submission_key(fields: list[tuple[str, str]], sender: str, recipients: Iterable[str],
                   user: str | None) -> str | None:
    """A fixed-size key for a submission, or None without a Message-ID (or with
    several: no one message is named); each queue entry's key is ``entry_key`` of it.

    A retry of a submission repeats all of it, so the key is the whole submission: the
    Message-ID, the envelope sender and every envelope recipient (sorted; mailboxes
    compared as the listener compares them: domain case and needless quoting do not
    count), so per-recipient copies under one Message-ID (Bcc copies sent one by one)
    are different messages; and the listener user ("" for none), so one tenant can
    neither suppress another's mail nor probe its ids. Then the entry's account: each
    entry of a message split by routing rules is one key, found again by a resubmission
    that reaches that account. The submission is hashed (a long or odd header cannot make
    the key table's index large); the account follows it as given."""
    message_id = message_id_of(fields)
    if not message_id:
        return None
    sender_key = recipient_key(sender) if sender else ""
    rcpts = sorted({recipient_key(r) for r in recipients})
    whole = json.dumps([message_id, sender_key, rcpts, user or ""], ensure_ascii=False)
    return hashlib.sha256(whole.encode("utf-8", "surrogateescape")).hexdigest()


def entry_key(submission: str, account: str) -> str:
    """The key of a submission's queue entry for ``account``."""
    return f"{submission}:{account}"
