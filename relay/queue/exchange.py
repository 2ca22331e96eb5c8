"""The export format of a whole queue (`relay queue export` / `import`): JSON lines.

Pure: lines in, records out, and back. One JSON object per line, in this order:

    {"format": "relay-queue", "version": 1, "schema": 4, "store": "sqlite", ...}  header
    {"type": "paused", "account": A, "at": T}                  each paused account
    {"type": "sends", "account": A, "at": [T, ...]}            send times, up to 1000 a line
    {"type": "message", "id": ..., "body": BASE64 | null, ...} each message, arrival order
    {"type": "end", "messages": N, "sends": N, "paused": N}    the last line: complete

A file without its end line (or whose counts differ) is incomplete: an interrupted
export or a truncated copy. Times are Unix seconds as JSON numbers (Python writes a float
so that it reads back the same), bodies base64. docs/queue.md describes every field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from relay.queue.types import (
    ExportedAttempt,
    ExportedMessage,
    MessageState,
    Priority,
    Recipient,
    RecipientState,
)

FORMAT = "relay-queue"
FORMAT_VERSION = 1  # raised when a field changes meaning or a required one is added
SENDS_PER_LINE = 1000


class ExportFormatError(ValueError):
    """A line that is not what the format says (``line`` numbers from 1; 0: the file as a
    whole)."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {reason}" if line else reason)


@dataclass(frozen=True)
class Header:
    version: int
    schema: int  # the source queue's schema (informative: the format is what is read)
    store: str
    exported_at: float
    relay: str


@dataclass(frozen=True)
class Paused:
    account: str
    at: float


@dataclass(frozen=True)
class Sends:
    account: str
    times: tuple[float, ...]


@dataclass(frozen=True)
class End:
    messages: int
    sends: int
    paused: int


Record = Header | Paused | Sends | ExportedMessage | End


# -- writing -----------------------------------------------------------------------------
def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n"


def header_line(header: Header) -> str:
    return _line({"format": FORMAT, "version": header.version, "schema": header.schema,
                  "store": header.store, "exported_at": header.exported_at,
                  "relay": header.relay})


def paused_line(paused: Paused) -> str:
    return _line({"type": "paused", "account": paused.account, "at": paused.at})


def sends_line(sends: Sends) -> str:
    return _line({"type": "sends", "account": sends.account, "at": list(sends.times)})


def end_line(end: End) -> str:
    return _line({"type": "end", "messages": end.messages, "sends": end.sends,
                  "paused": end.paused})


def message_line(m: ExportedMessage) -> str:
    return _line({
        "type": "message", "id": m.id, "state": str(m.state), "account": m.account,
        "priority": int(m.priority), "sender": m.sender,
        "recipients": [[r.address, str(r.state), r.reply] for r in m.recipients],
        "size": m.size, "attempts": m.attempts, "created_at": m.created_at,
        "next_attempt_at": m.next_attempt_at, "last_error": m.last_error,
        "updated_at": m.updated_at, "mail_options": list(m.mail_options),
        "attempts_log": [{"at": a.at, "account": a.account, "outcome": a.outcome,
                          "reply": a.reply, "transcript": list(a.transcript)}
                         for a in m.attempts_log],
        "body": None if m.body is None else base64.b64encode(m.body).decode("ascii"),
    })


class SendsBatcher:
    """Send times, given ordered by account, as lines of up to SENDS_PER_LINE."""

    def __init__(self) -> None:
        self._account = ""
        self._times: list[float] = []

    def add(self, account: str, at: float) -> Sends | None:
        """The line that is full once ``at`` comes (or its account changes), if any."""
        full = None
        if self._times and (account != self._account or len(self._times) >= SENDS_PER_LINE):
            full = self.flush()
        self._account = account
        self._times.append(at)
        return full

    def flush(self) -> Sends | None:
        if not self._times:
            return None
        line, self._times = Sends(self._account, tuple(self._times)), []
        return line


# -- reading -----------------------------------------------------------------------------
def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], line: int) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ExportFormatError(line, f"{key!r} is missing or not a {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "string", int: "integer", float: "number", list: "list", dict: "object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_NUMBER = (int, float)


def _message(obj: dict[str, Any], line: int) -> ExportedMessage:
    def f(key: str, kind: type | tuple[type, ...]) -> Any:
        return _field(obj, key, kind, line)

    try:
        recipients = tuple(Recipient(str(a), RecipientState(s), str(r))
                           for a, s, r in f("recipients", list))
        attempts_log = tuple(ExportedAttempt(float(a["at"]), str(a["account"]),
                                             str(a["outcome"]), str(a["reply"]),
                                             tuple(str(t) for t in a.get("transcript", ())))
                             for a in f("attempts_log", list))
        state, priority = MessageState(f("state", str)), Priority(f("priority", int))
    except ExportFormatError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportFormatError(line, f"message {obj.get('id')!r}: {exc}") from None
    body = obj.get("body")
    if body is not None:
        try:
            body = base64.b64decode(_field(obj, "body", str, line), validate=True)
        except binascii.Error:
            raise ExportFormatError(line, "'body' is not base64") from None
    return ExportedMessage(
        id=f("id", str), state=state, account=f("account", str), priority=priority,
        sender=f("sender", str), recipients=recipients, size=f("size", int),
        attempts=f("attempts", int), created_at=float(f("created_at", _NUMBER)),
        next_attempt_at=float(f("next_attempt_at", _NUMBER)),
        last_error=f("last_error", str), updated_at=float(f("updated_at", _NUMBER)),
        mail_options=tuple(str(o) for o in f("mail_options", list)),
        attempts_log=attempts_log, body=body,
    )


def parse_header(text: str) -> Header:
    """The first line; ExportFormatError unless it is this format, in a version known."""
    obj = _object(text, 1)
    if obj.get("format") != FORMAT:
        raise ExportFormatError(1, f"not a relay queue export (no \"format\": \"{FORMAT}\")")
    version = _field(obj, "version", int, 1)
    if version > FORMAT_VERSION:
        raise ExportFormatError(1, f"export format {version} is newer than this relay's"
                                   f" ({FORMAT_VERSION}): import it with a newer relay")
    return Header(version, _field(obj, "schema", int, 1), _field(obj, "store", str, 1),
                  float(_field(obj, "exported_at", _NUMBER, 1)), _field(obj, "relay", str, 1))


def _object(text: str, line: int) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        raise ExportFormatError(line, "not JSON") from None
    if not isinstance(obj, dict):
        raise ExportFormatError(line, "not a JSON object")
    return obj


def parse_record(text: str, line: int) -> Record:
    """One line after the header."""
    obj = _object(text, line)
    kind = obj.get("type")
    if kind == "message":
        return _message(obj, line)
    if kind == "sends":
        times = _field(obj, "at", list, line)
        if not all(isinstance(t, _NUMBER) and not isinstance(t, bool) for t in times):
            raise ExportFormatError(line, "'at' holds a value that is not a number")
        return Sends(_field(obj, "account", str, line), tuple(float(t) for t in times))
    if kind == "paused":
        return Paused(_field(obj, "account", str, line),
                      float(_field(obj, "at", _NUMBER, line)))
    if kind == "end":
        return End(_field(obj, "messages", int, line), _field(obj, "sends", int, line),
                   _field(obj, "paused", int, line))
    raise ExportFormatError(line, f"unknown record type {kind!r}")


_ORDER = {Paused: 0, Sends: 1, ExportedMessage: 2, End: 3}


class ExportReader:
    """The records of an export, read as consumed and checked in order: the header, then
    paused accounts, send times, messages, and the end line with matching counts."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self._number = 1
        first = next(self._lines, "")
        if not first.strip():
            raise ExportFormatError(1, "empty: no header line")
        self.header = parse_header(first)
        self._next: Record | None = None
        self._stage = 0
        self.counts = {"messages": 0, "sends": 0, "paused": 0}
        self.end: End | None = None

    def _peek(self) -> Record | None:
        if self._next is None and self.end is None:
            for text in self._lines:
                self._number += 1
                if text.strip():
                    self._next = parse_record(text, self._number)
                    break
            if self._next is not None:
                stage = _ORDER[type(self._next)]
                if stage < self._stage:
                    raise ExportFormatError(self._number, f"a {type(self._next).__name__}"
                                            " record out of order")
                self._stage = stage
        return self._next

    def _take(self, kind: type) -> Any:
        record = self._peek()
        if not isinstance(record, kind):
            return None
        self._next = None
        return record

    def paused(self) -> Iterator[Paused]:
        while (record := self._take(Paused)) is not None:
            self.counts["paused"] += 1
            yield record

    def sends(self) -> Iterator[tuple[str, float]]:
        while (record := self._take(Sends)) is not None:
            self.counts["sends"] += len(record.times)
            for at in record.times:
                yield record.account, at

    def messages(self) -> Iterator[ExportedMessage]:
        while (record := self._take(ExportedMessage)) is not None:
            self.counts["messages"] += 1
            yield record

    def finish(self) -> End:
        """The end line, checked against what was read; ExportFormatError when the file
        is incomplete or has more after it."""
        end: End | None = self._take(End)
        if end is None:
            what = self._peek()
            if what is None:
                raise ExportFormatError(self._number, "the file ends without its end line:"
                                        " the export is incomplete")
            raise ExportFormatError(self._number, "unexpected record before the end line")
        self.end = end
        found = (self.counts["messages"], self.counts["sends"], self.counts["paused"])
        if found != (end.messages, end.sends, end.paused):
            raise ExportFormatError(self._number, f"the end line counts {end.messages}"
                                    f" messages, {end.sends} sends, {end.paused} paused;"
                                    f" the file holds {found[0]}, {found[1]}, {found[2]}")
        for text in self._lines:
            self._number += 1
            if text.strip():
                raise ExportFormatError(self._number, "more after the end line")
        return end
