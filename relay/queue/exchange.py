"""The export format of a whole queue (`relay queue export` / `import`): JSON lines.

Pure: lines in, records out, and back. One JSON object per line, in this order:

    {"format": "relay-queue", "version": 1, "schema": 4, "store": "sqlite", ...}  header
    {"type": "paused", "account": A, "at": T}                  each paused account
    {"type": "sends", "account": A, "at": [T, ...]}            send times, up to 1000 a line
    {"type": "message", "id": ..., "body": BASE64 | null, ...} each message, arrival order
    {"type": "dedup", "key": K, "message_id": ID, "expires_at": T}  each dedup key (v2)
    {"type": "event", "id": ..., "webhook": W, "event": ..., ...}   each pending event (v2)
    {"type": "end", "messages": N, "sends": N, "paused": N, "dedup": N, "events": N}

The end line is the last: a file without it (or whose counts differ) is incomplete.
Version 1 files (no dedup or event lines, no such counts) still import.

An interrupted export or a truncated copy lacks the end line. Times are Unix seconds as
JSON numbers (Python writes a float so that it reads back the same), bodies base64.
docs/queue.md describes every field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from relay.queue.types import (
    ExportedAttempt,
    ExportedDedup,
    ExportedEvent,
    ExportedMessage,
    MessageState,
    Priority,
    Recipient,
    RecipientState,
    is_queue_id,
)

FORMAT = "relay-queue"
FORMAT_VERSION = 2  # raised when a field changes meaning or a required one is added
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
    dedup: int = 0  # version 2
    events: int = 0  # version 2


Record = Header | Paused | Sends | ExportedMessage | ExportedDedup | ExportedEvent | End


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
                  "paused": end.paused, "dedup": end.dedup, "events": end.events})


def dedup_line(d: ExportedDedup) -> str:
    return _line({"type": "dedup", "key": d.key, "message_id": d.message_id,
                  "expires_at": d.expires_at})


def event_line(e: ExportedEvent) -> str:
    return _line({"type": "event", "id": e.id, "webhook": e.webhook, "event": e.type,
                  "body": e.body, "created_at": e.created_at,
                  "next_attempt_at": e.next_attempt_at, "attempts": e.attempts,
                  "last_error": e.last_error})


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
    if kind == "dedup":
        return ExportedDedup(_field(obj, "key", str, line), _field(obj, "message_id", str, line),
                             float(_field(obj, "expires_at", _NUMBER, line)))
    if kind == "event":
        return ExportedEvent(
            _field(obj, "id", str, line), _field(obj, "webhook", str, line),
            _field(obj, "event", str, line), _field(obj, "body", str, line),
            float(_field(obj, "created_at", _NUMBER, line)),
            float(_field(obj, "next_attempt_at", _NUMBER, line)),
            _field(obj, "attempts", int, line), _field(obj, "last_error", str, line))
    if kind == "end":
        v2 = "dedup" in obj or "events" in obj  # a version 1 end line has neither
        return End(_field(obj, "messages", int, line), _field(obj, "sends", int, line),
                   _field(obj, "paused", int, line),
                   _field(obj, "dedup", int, line) if v2 else 0,
                   _field(obj, "events", int, line) if v2 else 0)
    raise ExportFormatError(line, f"unknown record type {kind!r}")


# -- what an import refuses, though well formed ------------------------------------------
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the last second a date prints as
FUTURE_SKEW_S = 300.0  # a send or arrival time this far ahead of our clock is not a record
_BREAKS = ("\r", "\n", "\0")


def _bad_time(name: str, at: float, now: float | None = None) -> str | None:
    if not math.isfinite(at) or not 0 <= at <= MAX_TIME:
        return f"{name!r} is {at!r}: not a time between 1970 and 9999"
    if now is not None and at > now + FUTURE_SKEW_S:
        return f"{name!r} is {at!r}: in the future"
    return None


def _broken(name: str, text: str) -> str | None:
    if any(c in text for c in _BREAKS):
        return f"{name!r} holds a CR, LF or NUL"
    return None


def _message_problem(m: ExportedMessage, now: float) -> str | None:
    if not is_queue_id(m.id):
        return "'id' is not a relay queue id (22 hex digits)"
    checks = [
        None if m.recipients else "'recipients' is empty",
        None if m.attempts >= 0 else f"'attempts' is {m.attempts}: negative",
        None if m.size >= 0 else f"'size' is {m.size}: negative",
        None if m.body is not None or m.state.final else
        f"'body' is null for a {m.state} message: it could never be sent",
        _bad_time("created_at", m.created_at, now), _bad_time("updated_at", m.updated_at),
        _bad_time("next_attempt_at", m.next_attempt_at),
        _broken("sender", m.sender), _broken("account", m.account),
        *(_broken("recipients", r.address) for r in m.recipients),
        *(_broken("mail_options", o) for o in m.mail_options),
        *(_bad_time("attempts_log", a.at) for a in m.attempts_log),
    ]
    return next((c for c in checks if c), None)


def problem(record: Record, now: float) -> str | None:
    """Why an import refuses ``record`` (well formed, but a value relay never writes and
    could not act on safely: an id that is not relay's, a time out of range, a line break
    that would end an SMTP command early), or None."""
    if isinstance(record, ExportedMessage):
        found = _message_problem(record, now)
        return None if found is None else f"message {record.id!r}: {found}"
    if isinstance(record, Sends):
        return next((f"sends of {record.account!r}: {p}" for t in record.times
                     if (p := _bad_time("at", t, now))), None)
    if isinstance(record, Paused):
        return _bad_time("at", record.at)
    if isinstance(record, ExportedDedup):
        if not is_queue_id(record.message_id):
            return "dedup: 'message_id' is not a relay queue id (22 hex digits)"
        return None if record.key else "dedup: 'key' is empty"
    if isinstance(record, ExportedEvent):
        checks = [None if record.id else "'id' is empty", _broken("id", record.id),
                  None if record.webhook else "'webhook' is empty",
                  None if record.attempts >= 0 else f"'attempts' is {record.attempts}",
                  _bad_time("created_at", record.created_at, now),
                  _bad_time("next_attempt_at", record.next_attempt_at)]
        found = next((c for c in checks if c), None)
        return None if found is None else f"event {record.id!r}: {found}"
    return None


_ORDER = {Paused: 0, Sends: 1, ExportedMessage: 2, ExportedDedup: 3, ExportedEvent: 4,
          End: 5}


class ExportReader:
    """The records of an export, read as consumed and checked in order: the header, then
    paused accounts, send times, messages, and the end line with matching counts."""

    def __init__(self, lines: Iterable[str], *, now: float | None = None) -> None:
        self._lines = iter(lines)
        self._now = time.time() if now is None else now  # for "in the future"
        self._number = 1
        first = next(self._lines, "")
        if not first.strip():
            raise ExportFormatError(1, "empty: no header line")
        self.header = parse_header(first)
        self._next: Record | None = None
        self._stage = 0
        self.counts = {"messages": 0, "sends": 0, "paused": 0, "dedup": 0, "events": 0}
        self.end: End | None = None

    def _peek(self) -> Record | None:
        if self._next is None and self.end is None:
            for text in self._lines:
                self._number += 1
                if text.strip():
                    self._next = parse_record(text, self._number)
                    if (why := problem(self._next, self._now)) is not None:
                        raise ExportFormatError(self._number, why)
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

    def dedup(self) -> Iterator[ExportedDedup]:
        while (record := self._take(ExportedDedup)) is not None:
            self.counts["dedup"] += 1
            yield record

    def events(self) -> Iterator[ExportedEvent]:
        while (record := self._take(ExportedEvent)) is not None:
            self.counts["events"] += 1
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
        c = self.counts
        found = (c["messages"], c["sends"], c["paused"], c["dedup"], c["events"])
        if found != (end.messages, end.sends, end.paused, end.dedup, end.events):
            raise ExportFormatError(self._number, f"the end line counts {end.messages}"
                                    f" messages, {end.sends} sends, {end.paused} paused,"
                                    f" {end.dedup} dedup keys, {end.events} events; the file"
                                    f" holds {', '.join(map(str, found))}")
        for text in self._lines:
            self._number += 1
            if text.strip():
                raise ExportFormatError(self._number, "more after the end line")
        return end
