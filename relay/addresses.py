"""Envelope addresses (RFC 5321 4.1.2): when two recipients are the same mailbox.

Pure: the listener asks, nothing here reads a socket.
"""

from __future__ import annotations


def recipient_key(address: str) -> str:
    """The mailbox an address names, for finding duplicates in one envelope.

    RFC 5321 2.4: the domain is case-insensitive, the local part may not be (only the
    receiving host can say), so the local part is compared as given.
    """
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}"
