"""Idempotent submission's key: which submissions are "the same message" (pure)."""

from __future__ import annotations

import hashlib

from relay.ingest.addresses import recipient_key


def dedup_key(fields: list[tuple[str, str]], sender: str) -> str | None:
    """A fixed-size key from the Message-ID header and the envelope sender (compared as
    the listener compares mailboxes: domain case and needless quoting do not count), or
    None without a Message-ID (or with several: no one message is named). Hashed so
    that a long or odd header cannot make the key table's index large."""
    ids = [value.strip() for name, value in fields if name.lower() == "message-id"]
    if len(ids) != 1 or not ids[0]:
        return None
    sender_key = recipient_key(sender) if sender else ""
    digest = hashlib.sha256(f"{ids[0]}\0{sender_key}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
