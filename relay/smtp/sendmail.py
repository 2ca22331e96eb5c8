"""The sendmail command line (`relay sendmail`, /usr/sbin/sendmail): what its options ask.

Parsed as Postfix's sendmail(1) parses them (POSIX getopt with its option string, so
``-FCronDaemon``, ``-oi``, ``-oem`` and ``-ti`` mean what they mean to cron, PHP, mutt and
git send-email), with Postfix's special cases: a lone ``-q`` flushes, ``-q30m`` is accepted
and ignored, options Postfix ignores are ignored here too. Options end at the first
recipient or at ``--``; a word like an option after a recipient is an error, never
an address nor an option (a caller such as PHP's mail() lets others add words).
Pure: argv in, an ``Invocation`` or a ``UsageError`` out.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

# Postfix sendmail.c's getopt string: these letters take an argument (in the same word,
# ``-fbob@example.com``, or the next one, ``-f bob@example.com``) ...
_WITH_ARGUMENT = frozenset("ABCFLNORVXbefhopqr")
# ... and these do not.
_FLAGS = frozenset("GIUcimntvx")


class Mode(enum.StrEnum):
    DELIVER = "deliver"  # -bm, the default: read a message, submit it
    LIST = "list"  # -bp, mailq
    FLUSH = "flush"  # -q
    # Nothing to do: -bi, -I, newaliases (relay has no aliases), and -q30m (a queue run
    # interval, which Postfix also accepts and then exits)
    NOTHING = "nothing"


class UsageError(ValueError):
    """The command line asks for something sendmail cannot do; the text says what."""


@dataclass(frozen=True)
class Invocation:
    mode: Mode = Mode.DELIVER
    sender: str | None = None  # -f/-r; "" or "<>": the null sender
    full_name: str | None = None  # -F: the From display name if the message has no From
    extract: bool = False  # -t: recipients from To/Cc/Bcc too
    sender_from_header: bool = False  # msmtp's --read-envelope-from: -f from the From field
    dots_end_input: bool = True  # a lone "." line ends the input unless -i/-oi
    body_type: str | None = None  # -B 8BITMIME / 7BIT
    recipients: tuple[str, ...] = ()
    verbose: int = 0  # -v
    config: str | None = None  # --config FILE
    help: bool = False
    ignored: tuple[str, ...] = field(default=())  # options accepted and ignored (-v says)


_MODES = {"m": Mode.DELIVER, "p": Mode.LIST, "i": Mode.NOTHING}
_NOT_HERE = {
    "d": "-bd (daemon mode): run `relay serve` instead",
    "s": "-bs (SMTP on standard input): submit over SMTP to relay's listener instead",
    "v": "-bv (address verification) is not supported",
}


def parse_argv(argv: Sequence[str], *, prog: str = "sendmail") -> Invocation:
    """The invocation ``argv`` (without the program name) asks for.

    ``prog``: the name it was run as; ``mailq`` lists the queue, ``newaliases`` does
    nothing, as with Postfix.
    """
    state = _Parsing({"mailq": Mode.LIST, "newaliases": Mode.NOTHING}.get(prog, Mode.DELIVER))
    i = 0
    dashes = False
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            dashes = True
            break
        if arg.startswith("--"):
            i = _long_option(argv, i, state.values)
        elif not arg.startswith("-") or arg == "-":
            break
        elif arg == "-q":  # not parsable by getopt (Postfix treats it apart too)
            state.flush = True
            i += 1
        elif arg == "-V":  # VERP without delimiters: nothing to do here
            state.ignored.append(arg)
            i += 1
        else:
            i = _cluster(argv, i, state)
    mode = Mode.FLUSH if state.flush else state.mode
    recipients = tuple(argv[i:])
    late = [r for r in recipients if r.startswith("-") and r != "-"]
    if late and not dashes:  # never an option (-f, --config) taken as an address, nor
        # the reverse: as Postfix, options go first; `--` before an address with a dash
        raise UsageError(f"{late[0]} after the recipients: options go first (-- before"
                         " a recipient that starts with -)")
    if state.values.get("extract") and mode is not Mode.DELIVER:
        raise UsageError("-t can be used only in delivery mode")
    if recipients and mode is not Mode.DELIVER:
        raise UsageError(f"{mode} mode takes no recipients")
    return Invocation(mode=mode, recipients=recipients, verbose=state.verbose,
                      ignored=tuple(state.ignored), **state.values)  # type: ignore[arg-type]


@dataclass
class _Parsing:
    mode: Mode
    flush: bool = False
    verbose: int = 0
    values: dict[str, object] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _cluster(argv: Sequence[str], i: int, state: _Parsing) -> int:
    """One word of single-letter options (``-ti``, ``-FCron``, ``-f``, ``VALUE``): the
    index of the next word."""
    arg = argv[i]
    for pos in range(1, len(arg)):
        letter = arg[pos]
        if letter in _WITH_ARGUMENT:
            value = arg[pos + 1:]
            if not value:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option -{letter} needs a value")
                value = argv[i]
            _with_argument(letter, value, state)
            break
        if letter not in _FLAGS:
            raise UsageError(f"unknown option -{letter}")
        if letter == "t":
            state.values["extract"] = True
        elif letter == "i":
            state.values["dots_end_input"] = False
        elif letter == "v":
            state.verbose += 1
        elif letter == "I":
            state.mode = Mode.NOTHING
        else:
            state.ignored.append(f"-{letter}")
    return i + 1


# msmtp's long spellings, for callers set up for it (`msmtp -t --read-envelope-from`).
_MSMTP = {"--read-recipients": "extract", "--read-envelope-from": "sender_from_header"}


def _long_option(argv: Sequence[str], i: int, values: dict[str, object]) -> int:
    """``--config FILE``, ``--config=FILE``, ``--help`` (relay's own), and msmtp's
    ``--read-recipients`` and ``--read-envelope-from``."""
    name, eq, value = argv[i].partition("=")
    if name == "--help":
        values["help"] = True
        return i + 1
    if name in _MSMTP and not eq:
        values[_MSMTP[name]] = True
        return i + 1
    if name != "--config":
        raise UsageError(f"unknown option {name}")
    if not eq:
        if i + 1 >= len(argv):
            raise UsageError("option --config needs a file")
        value = argv[i + 1]
        i += 1
    values["config"] = value
    return i + 1


def _one_address(letter: str, value: str) -> str:
    """-f's value: one address, never more words smuggled in with it."""
    if any(c.isspace() for c in value):
        raise UsageError(f"-{letter} takes one address, without spaces")
    return value


def _with_argument(letter: str, value: str, state: _Parsing) -> None:
    """One option that takes a value."""
    values = state.values
    if letter in "fr":  # -r: the old spelling of -f
        values["sender"] = _one_address(letter, value)
    elif letter == "F":
        values["full_name"] = value
    elif letter == "B":
        if value.upper() not in ("8BITMIME", "7BIT"):
            raise UsageError("-B needs 8BITMIME or 7BIT")
        values["body_type"] = value.upper()
    elif letter == "b":
        if value[:1] in _NOT_HERE:
            raise UsageError(_NOT_HERE[value[:1]])
        if value[:1] not in _MODES:
            raise UsageError(f"unsupported: -b{value[:1]}")
        state.mode = _MODES[value[:1]]
    elif letter == "o":
        if value == "i":  # -oi: the same as -i
            values["dots_end_input"] = False
        else:  # -oem, -odb, -odi, -oQ..., -om, -o7, -o8: sendmail.cf options
            state.ignored.append(f"-o{value}")
    elif letter == "q":
        if not value[:1].isdigit():  # -qRsite, -qIid, -qSsite
            raise UsageError(f"-q{value[:1]} is not supported (use -q to flush the queue)")
        state.mode = Mode.NOTHING  # a queue run interval: the server runs the queue itself
    else:  # -A -C -L -N -O -R -V -X -e -h -p: accepted and ignored, as by Postfix
        state.ignored.append(f"-{letter} {value}")
