"""Client- and upstream-supplied text made safe for one log line or one terminal line.

A CR or LF in a user name would forge a whole log line; an ESC sequence in a header value
would drive the operator's terminal. Every such value goes through escape() before it is
written as text (logs.event, the text log formatter, every `relay` CLI printer).
"""

from __future__ import annotations

import re

# C0 controls (CR, LF, tab...), DEL, C1 controls, and the Unicode characters that break or
# reorder a line on screen: line/paragraph separators, bidi marks, overrides and isolates.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
_NEEDS_QUOTES = re.compile(r'[\s"\\]')


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT.get(char) or f"\\u{ord(char):04x}"


def escape(text: str) -> str:
    """``text`` with CR, LF and tab as \\r \\n \\t and every other control as \\uXXXX."""
    return UNSAFE.sub(_escaped, text)


def field_value(text: str) -> str:
    """A key=value log field: bare if it is one safe word, else a quoted JSON-style
    string (quotes and backslashes escaped too), so no value can end its field early."""
    if text and not _NEEDS_QUOTES.search(text) and not UNSAFE.search(text):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
