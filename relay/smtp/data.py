"""The DATA section of an incoming session, read a chunk at a time (RFC 5321 4.5.2).

aiosmtpd reads DATA one line per ``readuntil`` call: about 130 awaits for a 10 KB
message, which was a third of ingest's CPU. ``DataReader`` gives the same answers from
whole chunks: only CRLF ends a line, only a line that is a lone dot ends the data (so a
bare LF or CR never does: no SMTP smuggling), lines over the line limit and data over the
size limit are recorded and their bytes dropped (never buffered without bound), and a
leading dot is removed from each line. Pure: the listener feeds it what it reads.
"""

from __future__ import annotations

import enum
import re

_DOT = 0x2E
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


def has_bare_newline(data: bytes) -> bool:
    """A CR or LF that is not part of CRLF (the raw material of SMTP smuggling)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\n") != pairs or data.count(b"\r") != pairs


def normalize_newlines(data: bytes) -> bytes:
    """Every CR, LF and CRLF as CRLF."""
    return _LINE_ENDINGS.sub(b"\r\n", data)


class DataState(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()  # a line over the limit: 500
    TOO_MUCH = enum.auto()  # more than the size limit: 552


class DataReader:
    """Feed chunks until ``feed`` returns True; then ``state``, ``content`` and ``rest``.

    The limits are aiosmtpd's: a line (CRLF included) may be ``line_limit`` octets, and
    the data (every line with its CRLF and its dot, the final dot line excluded)
    ``size_limit`` octets (0: no limit). Like aiosmtpd, the first limit crossed wins.
    """

    def __init__(self, *, size_limit: int | None, line_limit: int) -> None:
        self._size_limit = size_limit or 0
        self._line_limit = line_limit
        self._buffer = bytearray()  # from a line start (or inside an overlong line)
        self._parts: list[bytes] = []  # complete lines, as received, while NOMINAL
        self._size = 0
        self._in_long_line = False  # dropping the rest of an overlong line
        self.state = DataState.NOMINAL
        self.rest = b""  # what came after the final dot (the client's next commands)

    def feed(self, chunk: bytes) -> bool:
        buf = self._buffer
        buf += chunk
        start = 0
        while (end := buf.find(b"\r\n", start)) != -1:
            length = end + 2 - start
            if self._in_long_line:
                self._in_long_line = False
            elif length == 3 and buf[start] == _DOT:
                self._keep(buf, start)
                self.rest = bytes(buf[end + 2 :])
                buf.clear()
                return True
            elif self.state is DataState.NOMINAL:
                self._count(length)
            start = end + 2
        self._keep(buf, start)
        del buf[:start]
        if len(buf) > self._line_limit:  # no line end in sight: drop it, remember why
            if self.state is DataState.NOMINAL:
                self._fail(DataState.TOO_LONG)
            carriage_return = buf.endswith(b"\r")  # maybe half of the CRLF that ends it
            buf.clear()
            if carriage_return:
                buf += b"\r"
            self._in_long_line = True
        return False

    def _count(self, length: int) -> None:
        # aiosmtpd's order: a line too long for its stream reader (the CRLF more than
        # two octets past the limit) fails before it is counted; others are counted first.
        if length > self._line_limit + 2:
            self._fail(DataState.TOO_LONG)
            return
        self._size += length
        if self._size_limit and self._size > self._size_limit:
            self._fail(DataState.TOO_MUCH)
        elif length > self._line_limit:
            self._fail(DataState.TOO_LONG)

    def _keep(self, buf: bytearray, end: int) -> None:
        if end and self.state is DataState.NOMINAL:
            self._parts.append(bytes(buf[:end]))

    def _fail(self, state: DataState) -> None:
        self.state = state
        self._parts.clear()

    def content(self) -> bytes:
        """The message: CRLF lines with the transparency dots removed."""
        raw = b"".join(self._parts)
        if raw.startswith(b"."):
            raw = raw[1:]
        # "\r\n.\r\n" cannot occur inside (it would have ended the data), so every
        # "\r\n." is one line start.
        return raw.replace(b"\r\n.", b"\r\n")
