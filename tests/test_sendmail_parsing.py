"""The pure parts of `relay sendmail`: its options (relay.smtp.sendmail) and what it does
to the message (relay.smtp.pickup), as cron, PHP, git send-email and mutt call it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.pickup import BadAddress, Local, NoRecipients, input_lines, prepare, split_header
from relay.smtp.sendmail import Invocation, Mode, UsageError, parse_argv

LOCAL = Local(login="alice", domain="host.example.com", date="Tue, 01 Dec 2026 00:00:00 +0000",
              message_id="<id1@host.example.com>")


def test_cron_command_line() -> None:
    # cronie and Debian cron: /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem USER
    got = parse_argv(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "alice"])
    assert got == Invocation(full_name="CronDaemon", dots_end_input=False,
                             body_type="8BITMIME", recipients=("alice",), ignored=("-oem",))


def test_cronie_command_line() -> None:
    got = parse_argv(["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"])
    assert got == Invocation(full_name="CronDaemon", dots_end_input=False, extract=True,
                             sender="root", ignored=("-odi", "-oem"))


def test_php_and_git_send_email_command_lines() -> None:
    assert parse_argv(["-t", "-i"]) == Invocation(extract=True, dots_end_input=False)
    # git send-email: sendmail -i -f FROM RCPT...
    got = parse_argv(["-i", "-f", "me@example.com", "a@example.com", "b@example.com"])
    assert (got.sender, got.recipients) == ("me@example.com", ("a@example.com", "b@example.com"))
    assert parse_argv(["-fme@example.com", "-ti"]).sender == "me@example.com"
    assert parse_argv(["-ti"]).extract and not parse_argv(["-ti"]).dots_end_input


def test_common_no_ops_are_accepted() -> None:
    got = parse_argv(["-oi", "-odi", "-odb", "-oQ/var/spool", "-om", "-v", "-U", "-G",
                      "-L", "cron", "-N", "never", "-h", "5", "-C", "/etc/sendmail.cf", "x@y.z"])
    assert not got.dots_end_input and got.verbose == 1 and got.recipients == ("x@y.z",)
    assert "-odi" in got.ignored and "-C /etc/sendmail.cf" in got.ignored


def test_msmtp_long_options() -> None:
    got = parse_argv(["--read-recipients", "--read-envelope-from", "-i"])
    assert got.extract and got.sender_from_header and not got.dots_end_input
    lines = [b"From: App <app@example.com>", b"To: a@example.com", b"", b"x"]
    prepared = prepare(lines, sender=None, arguments=[], extract=True, local=LOCAL,
                       sender_from_header=True)
    assert prepared.sender == "app@example.com"
    # -f wins; without a From field, the login name.
    assert prepare(lines, sender="b@example.com", arguments=[], extract=True, local=LOCAL,
                   sender_from_header=True).sender == "b@example.com"
    assert prepare(lines[1:], sender=None, arguments=[], extract=True, local=LOCAL,
                   sender_from_header=True).sender == "alice@host.example.com"


def test_modes() -> None:
    assert parse_argv(["-bp"]).mode is Mode.LIST
    assert parse_argv([], prog="mailq").mode is Mode.LIST
    assert parse_argv(["-q"]).mode is Mode.FLUSH
    assert parse_argv(["-q30m"]).mode is Mode.NOTHING  # Postfix: accepted, nothing done
    assert parse_argv(["-bi"]).mode is Mode.NOTHING
    assert parse_argv([], prog="newaliases").mode is Mode.NOTHING
    assert parse_argv(["-bp", "-bm", "x@y.z"]).mode is Mode.DELIVER
    assert parse_argv(["--config", "f.yaml", "-t"]).config == "f.yaml"
    assert parse_argv(["--config=f.yaml", "-t"]).config == "f.yaml"


def test_options_end_at_the_first_recipient_or_double_dash() -> None:
    assert parse_argv(["a@example.com", "b@example.com"]).recipients == (
        "a@example.com", "b@example.com")
    assert parse_argv(["--", "a@b.c", "-t"]).recipients == ("a@b.c", "-t")
    assert parse_argv(["--", "-odd@example.com"]).recipients == ("-odd@example.com",)
    assert parse_argv(["-f", "<>", "a@b.c"]).sender == "<>"


@pytest.mark.parametrize(("argv", "says"), [
    (["-Z"], "unknown option -Z"),
    (["-f"], "-f needs a value"),
    (["-bs"], "-bs"),
    (["-bd"], "relay serve"),
    (["-bx"], "unsupported: -bx"),
    (["-B", "BINARYMIME"], "8BITMIME or 7BIT"),
    (["-qRexample.com"], "-qR is not supported"),
    (["-bp", "-t"], "-t can be used only in delivery mode"),
    (["-bp", "a@b.c"], "takes no recipients"),
    (["--frobnicate"], "unknown option --frobnicate"),
    # a1 #12, #2: an option after a recipient is neither an address nor an option
    (["a@example.com", "-f", "x@y.z"], "-f after the recipients"),
    (["a@example.com", "--config=/tmp/evil.yaml"], "--config=/tmp/evil.yaml after the"),
    (["-f", "a@b.c --config=/tmp/x"], "-f takes one address, without spaces"),
])
def test_usage_errors_name_the_option(argv: list[str], says: str) -> None:
    with pytest.raises(UsageError, match=says.replace("(", r"\(")):
        parse_argv(argv)


def test_a_lone_dot_ends_the_input_unless_dash_i() -> None:
    raw = b"Subject: s\n\none\n.\ntwo\n"
    assert input_lines(raw, dots_end_input=True) == [b"Subject: s", b"", b"one"]
    assert input_lines(raw, dots_end_input=False) == [b"Subject: s", b"", b"one", b".", b"two"]
    # LF and CRLF end lines; an mbox "From " line is not a header. A lone CR is no line
    # end (a1 #12: it would start a field that a reader of the raw bytes never sees).
    assert input_lines(b"From alice Tue\r\nA: 1\rB: 2\r\n\nx", dots_end_input=True) == [
        b"A: 1 B: 2", b"", b"x"]


def test_header_section_ends_at_blank_or_at_a_line_that_is_no_field() -> None:
    assert split_header([b"A: 1", b" more", b"", b"body"]) == ([b"A: 1", b" more"], [b"body"])
    assert split_header([b"just text", b"more"]) == ([], [b"just text", b"more"])
    assert split_header([b"A: 1", b"text"]) == ([b"A: 1"], [b"text"])


def test_missing_from_date_message_id_are_added_at_the_end_of_the_header() -> None:
    got = prepare([b"Subject: s", b"", b"hello"], sender=None, arguments=["bob@example.com"],
                  extract=False, local=Local(**{**LOCAL.__dict__, "full_name": "Cron Daemon"}))
    assert got.sender == "alice@host.example.com"
    assert got.recipients == ("bob@example.com",)
    assert got.data == (b"Subject: s\r\nFrom: Cron Daemon <alice@host.example.com>\r\n"
                        b"Date: Tue, 01 Dec 2026 00:00:00 +0000\r\n"
                        b"Message-ID: <id1@host.example.com>\r\n\r\nhello\r\n")


def test_a_name_with_a_line_break_stays_in_its_field() -> None:
    local = Local(**{**LOCAL.__dict__, "full_name": "Eve\r\nBcc: victim@example.com"})
    got = prepare([b"x"], sender=None, arguments=["a@example.com"], extract=False,
                  local=local)
    assert b"\r\nBcc" not in got.data
    assert got.data.startswith(b'From: "Eve Bcc: victim@example.com" <alice@host.example.com>')


def test_present_headers_are_kept_and_a_body_without_header_gets_one() -> None:
    lines = [b"From: App <app@example.com>", b"Date: x", b"Message-ID: <m@x>", b"", b"b"]
    got = prepare(lines, sender="app@example.com", arguments=["b@example.com"], extract=False,
                  local=LOCAL)
    assert got.data == b"From: App <app@example.com>\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nb\r\n"
    bare = prepare([b"no header here"], sender="", arguments=["root"], extract=False,
                   local=LOCAL)
    assert bare.sender == ""
    assert bare.data.startswith(b"From: alice@host.example.com\r\n")
    assert bare.data.endswith(b"\r\n\r\nno header here\r\n")


def test_dash_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    lines = [b"To: A <a@example.com>, b@example.com", b"Cc: undisclosed-recipients:;",
             b"Bcc: secret@example.com,", b"  hidden@example.com", b"Subject: s", b"", b"x"]
    got = prepare(lines, sender=None, arguments=["c@example.com"], extract=True, local=LOCAL)
    assert got.recipients == ("c@example.com", "a@example.com", "b@example.com",
                              "secret@example.com", "hidden@example.com")
    assert b"Bcc" not in got.data and b"hidden" not in got.data
    assert b"Subject: s\r\n" in got.data
    # Without -t, Bcc fields go too (RFC 5322 3.6.3), recipients from the arguments only.
    plain = prepare(lines, sender=None, arguments=["c@example.com"], extract=False, local=LOCAL)
    assert plain.recipients == ("c@example.com",) and b"Bcc" not in plain.data


def test_dash_t_prefers_resent_fields() -> None:
    lines = [b"To: old@example.com", b"Resent-To: new@example.com",
             b"Resent-Bcc: hid@example.com", b"", b"x"]
    got = prepare(lines, sender=None, arguments=[], extract=True, local=LOCAL)
    assert got.recipients == ("new@example.com", "hid@example.com")
    assert b"Resent-Bcc" not in got.data and b"Resent-To: new@example.com" in got.data


def test_local_names_are_qualified_or_go_to_the_admin_address() -> None:
    got = prepare([b"x"], sender="cron", arguments=["root", "a@example.com, Bob <b@x.org>"],
                  extract=False, local=LOCAL)
    assert got.sender == "cron@host.example.com"
    assert got.recipients == ("root@host.example.com", "a@example.com", "b@x.org")
    admin = Local(**{**LOCAL.__dict__, "admin_address": "ops@example.com"})
    got = prepare([b"x"], sender=None, arguments=["root", "www-data", "a@example.com"],
                  extract=False, local=admin)
    assert got.recipients == ("ops@example.com", "a@example.com")  # one copy for the admin
    assert got.sender == "alice@host.example.com"  # the sender is not the admin's


def test_dash_f_takes_the_address_of_a_name_and_address() -> None:
    for option, sender in (("Bob <bob@example.com>", "bob@example.com"), ("<>", ""),
                           ("", ""), ("bob", "bob@host.example.com")):
        got = prepare([b"x"], sender=option, arguments=["a@example.com"], extract=False,
                      local=LOCAL)
        assert got.sender == sender, option


def test_an_argument_without_an_address_is_refused() -> None:
    with pytest.raises(BadAddress, match="'<>'"):
        prepare([b"x"], sender=None, arguments=["a@example.com", "<>"], extract=False,
                local=LOCAL)


def test_no_recipients() -> None:
    with pytest.raises(NoRecipients, match="no recipients"):
        prepare([b"To: a@example.com", b"", b"x"], sender=None, arguments=[], extract=False,
                local=LOCAL)
    with pytest.raises(NoRecipients):
        prepare([b"Subject: s", b"", b"x"], sender=None, arguments=[], extract=True,
                local=LOCAL)


def test_long_lines_are_broken_to_fit_smtp() -> None:
    long_header = b"X-Long: " + b"h" * 2500
    got = prepare([long_header, b"", b"b" * 2000], sender="a@b.c", arguments=["d@e.f"],
                  extract=False, local=LOCAL)
    lines = got.data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    header, _, body = got.data.partition(b"\r\n\r\n")
    # The header field stays one field (folded), the body keeps every byte.
    assert header.replace(b"\r\n ", b"").startswith(long_header)
    assert body.replace(b"\r\n", b"") == b"b" * 2000


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=3000) | st.lists(st.sampled_from(
    ["a", " ", ":", "\n", "\r", ".", "Bcc: x@y.z", "To: a@b.c", "From ", "\t", "\u00e9",
     "x" * 700]), max_size=60).map(lambda parts: "".join(parts).encode()),
    dots=st.booleans(), extract=st.booleans())
def test_whatever_comes_in_goes_out_as_smtp_accepts_it(raw: bytes, dots: bool,
                                                       extract: bool) -> None:
    """Any input: refused as a bad address (65), or CRLF lines only (no bare CR or LF for
    the listener to refuse), none over 998 octets, a blank line after the header
    section, and no Bcc field left."""
    try:
        got = prepare(input_lines(raw, dots_end_input=dots), sender=None,
                      arguments=["a@example.com"], extract=extract, local=LOCAL)
    except BadAddress as exc:
        assert extract and "bad address list" in str(exc)
        return
    data = got.data
    assert data.endswith(b"\r\n")
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    header, blank, _ = data.partition(b"\r\n\r\n")
    assert blank
    fields = [line.split(b":", 1)[0].strip().lower() for line in header.split(b"\r\n")
              if not line.startswith((b" ", b"\t"))]
    assert b"bcc" not in fields and b"resent-bcc" not in fields
    assert {b"from", b"date", b"message-id"} <= set(fields)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["-t", "-i", "-f", "-F", "-o", "-oi", "-b", "-bp", "-q",
                                 "-q1h", "-qR", "-B", "--", "--config", "--config=x", "-",
                                 "-V", "-x", "a@b.c", "", "-fa@b.c", "-ti"])
                | st.text(max_size=4), max_size=8))
def test_any_command_line_parses_or_is_a_usage_error(argv: list[str]) -> None:
    """Never an exception other than UsageError (which sendmail turns into exit 64)."""
    try:
        got = parse_argv(argv)
    except UsageError as exc:
        assert str(exc)
        return
    assert got.mode in set(Mode)


@pytest.mark.parametrize("smuggled", [
    "alice@example.org)<evil@evil.com>",
    "alice@example.org <evil@evil.com>",
    "<alice@example.org> <evil@evil.com>",
])
def test_a_field_that_reads_as_two_things_is_refused(smuggled: str) -> None:
    """a1 #12: email.utils reads these as two recipients, RFC 5322 as one (or none): a
    recipient smuggled past a web form's check; 65 with the field, not a guess."""
    lines = [f"To: {smuggled}".encode(), b"Subject: s", b"", b"x"]
    with pytest.raises(BadAddress, match="bad address list"):
        prepare(lines, sender=None, arguments=[], extract=True, local=LOCAL)
    with pytest.raises(BadAddress, match="bad recipient address"):
        prepare([b"Subject: s", b"", b"x"], sender=None, arguments=[smuggled],
                extract=False, local=LOCAL)


def test_a_lone_cr_starts_no_field() -> None:
    """a1 #12: with -t, ``To: a@x\\rBcc: evil`` was two fields, a Bcc that the sender's
    own view of the message does not show."""
    raw = b"To: a@example.com\rCc: evil@evil.com\nSubject: s\n\nx\n"
    with pytest.raises(BadAddress):  # "a@example.com Cc: evil@evil.com": not an address
        prepare(input_lines(raw, dots_end_input=True), sender=None, arguments=[],
                extract=True, local=LOCAL)
    got = prepare(input_lines(b"Subject: a\rb\nTo: a@example.com\n\nx\ry\n",
                              dots_end_input=True),
                  sender=None, arguments=[], extract=True, local=LOCAL)
    assert got.recipients == ("a@example.com",)
    assert got.data.startswith(b"Subject: a b\r\nTo: a@example.com\r\n")
    assert b"\r\n\r\nx y\r\n" in got.data
