"""Reading and removing header fields in raw message bytes, without re-serialising.

Only the header section is touched; every other byte of the message passes through as
it came, so signatures (DKIM) made by the application stay valid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# RFC 5322 2.2: field-name is printable US-ASCII except ':'.
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_FOLD = (b" ", b"\t")


def header_end(body: bytes) -> int:
    """Offset where the blank line that ends the header section starts (len(body) if none)."""
    if body.startswith((b"\r\n", b"\n")):
        return 0
    crlf = body.find(b"\r\n\r\n")
    # An LF-only blank line counts only if it comes first; never scan the body for one.
    lf = body.find(b"\n\n", 0, crlf if crlf >= 0 else len(body))
    if lf >= 0:
        return lf + 1
    return crlf + 2 if crlf >= 0 else len(body)


def _lines(section: bytes) -> list[bytes]:
    return section.splitlines(keepends=True)


def parse_headers(body: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) for every field in the header section, in order.

    Linear in the section's size: a field's folded lines are collected and joined once
    (adding to the value per line was quadratic: seconds for a field folded 400,000 times).
    """
    fields: list[tuple[str, str]] = []
    folded: dict[int, list[str]] = {}  # field index -> its value's parts, joined at the end
    for line in _lines(body[: header_end(body)]):
        if line.startswith(_FOLD) and fields:
            last = len(fields) - 1
            parts = folded.get(last) or folded.setdefault(last, [fields[last][1]])
            parts.append(line.strip().decode("utf-8", "replace"))
            continue
        match = _FIELD.match(line)
        if match:
            name = match.group(1).decode("ascii")
            fields.append((name, line[match.end() :].strip().decode("utf-8", "replace")))
    for index, parts in folded.items():
        fields[index] = (fields[index][0], " ".join(parts))
    return fields


def header_section_exceeds(body: bytes, limit: int) -> bool:
    """Whether the header section is longer than limit bytes (reads at most limit + 1).

    As in Postfix, the section ends at the blank line or at the first line that is neither
    a field nor a folded continuation; what follows is body.
    """
    if header_end(body) <= limit:
        return False
    # False at the first line that ends the section before the limit.
    return all(line.startswith(_FOLD) or _FIELD.match(line)
               for line in _lines(body[: limit + 1]))


def message_id_of(fields: Sequence[tuple[str, str]]) -> str | None:
    """The Message-ID header's value, if the message has exactly one."""
    ids = [v.strip() for k, v in fields if k.lower() == "message-id"]
    return ids[0] if len(ids) == 1 else None


def get_header(fields: list[tuple[str, str]], name: str) -> str | None:
    """The first field of that name (case-insensitive), or None."""
    wanted = name.lower()
    for key, value in fields:
        if key.lower() == wanted:
            return value
    return None


def raw_header(body: bytes, name: str) -> bytes | None:
    """The first field of that name's value as it came (folds kept, bytes as sent), or
    None: for copying a value into another field without decoding it."""
    wanted = name.lower()
    found: list[bytes] | None = None
    for line in _lines(body[: header_end(body)]):
        if found is not None:
            if not line.startswith(_FOLD):
                break
            found.append(line)
            continue
        match = _FIELD.match(line)
        if match and match.group(1).decode("ascii").lower() == wanted:
            found = [line[match.end():]]
    return None if found is None else b"".join(found).strip()


def remove_headers(body: bytes, names: set[str]) -> bytes:
    """The message without the named fields (and their folded lines); all else unchanged."""
    wanted = {n.lower() for n in names}
    end = header_end(body)
    kept: list[bytes | memoryview] = []
    dropping = False
    removed = False
    for line in _lines(body[:end]):
        if line.startswith(_FOLD):
            if not dropping:
                kept.append(line)
            continue
        match = _FIELD.match(line)
        dropping = bool(match and match.group(1).decode("ascii").lower() in wanted)
        removed = removed or dropping
        if not dropping:
            kept.append(line)
    if not removed:
        return body
    kept.append(memoryview(body)[end:])  # the body is copied once, into the result
    return b"".join(kept)
