"""`relay sendmail` / `sendmail` as its callers run it: real processes (the command
itself, cron's command line, PHP's mail(), git send-email) against a real relay
listener and the fault-injecting upstream, and with no relay listening (straight into
the queue file, sent by the next start)."""

from __future__ import annotations

import asyncio
import email
import email.header
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from relay.app import App
from relay.config.loading import load_config
from tests.conftest import StartRelay, metric, wait_until
from tests.relayproc import write_config
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SENDMAIL = str(BIN / "sendmail")


async def sendmail(*argv: str, stdin: bytes, config: Path | None = None,
                   program: str = SENDMAIL, cwd: Path | None = None
                   ) -> tuple[int, str]:
    """Run the installed `sendmail` entry point; (exit code, stderr)."""
    env = {**os.environ}
    env.pop("RELAY_CONFIG", None)
    if config is not None:
        env["RELAY_CONFIG"] = str(config)
    proc = await asyncio.create_subprocess_exec(
        program, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def running(tmp_path: Path, up: FakeUpstream, start_relay: StartRelay,
                  **sendmail: object) -> tuple[Path, App]:
    """A config file and a relay started from it (listening on the file's port)."""
    path = write_config(tmp_path, up)
    if sendmail:
        data = yaml.safe_load(path.read_text())
        data["sendmail"] = sendmail
        path.write_text(yaml.safe_dump(data))
    return path, await start_relay(load_config(path))


def received(up: FakeUpstream, n: int = 0) -> email.message.Message:
    return email.message_from_bytes(up.messages[n].data)


@pytest.mark.parametrize("argv", [
    # Debian's cron: MAILTO (or the crontab's owner) as the argument.
    ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
    # cronie (Fedora, RHEL): recipients from To (MAILTO), sender the MAILFROM user.
    ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"],
], ids=["debian-cron", "cronie"])
async def test_cron_command_lines_through_the_listener(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        argv: list[str]) -> None:
    """cron's exact command lines, LF lines, a header section of its own, a lone dot
    kept (-i), `root` as recipient (to sendmail.admin_address) and as sender."""
    config, _ = await running(tmp_path, upstream, start_relay,
                              admin_address="ops@example.com", domain="vm.example.com")
    job_output = ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@vm> backup\n"
                  "Content-Type: text/plain; charset=UTF-8\n\ncaf\u00e9\n.\ndone\n")
    code, err = await sendmail(*argv, stdin=job_output.encode(), config=config)
    assert (code, err) == (0, "")
    await upstream.wait_for_messages(1)
    got = upstream.messages[0]
    assert got.rcpt_tos == ("ops@example.com",)
    if "-f" in argv:
        assert got.mail_from == "root@vm.example.com"
    assert "BODY=8BITMIME" in got.mail_options
    assert b"\r\ncaf\xc3\xa9\r\n.\r\ndone\r\n" in got.data  # the dot line is data with -i
    message = received(upstream)
    assert message["Subject"] == "Cron <root@vm> backup"
    assert message["To"] == "root"  # the header as cron wrote it; the envelope is qualified
    assert message["Date"] and message["Message-ID"]  # added, as Postfix's cleanup does


async def test_php_mail_function(tmp_path: Path, upstream: FakeUpstream,
                                 start_relay: StartRelay) -> None:
    """PHP's mail() with sendmail_path = "sendmail -t -i": recipients from To, the Bcc
    its additional headers carry delivered and removed."""
    php = shutil.which("php")
    if php is None:
        pytest.skip("needs php (php-cli, installed by .ci/run on CI)")
    config, _ = await running(tmp_path, upstream, start_relay)
    script = ('$ok = mail("to@example.com", "Hello from PHP", "line one\\n.\\nline two",'
              ' "From: app@example.com\\r\\nBcc: hidden@example.com");'
              ' exit($ok ? 0 : 3);')
    code, err = await sendmail("-d", f"sendmail_path={SENDMAIL} -t -i", "-r", script,
                               stdin=b"", config=config, program=php)
    assert (code, err) == (0, "")
    await upstream.wait_for_messages(1)
    got = upstream.messages[0]
    assert sorted(got.rcpt_tos) == ["hidden@example.com", "to@example.com"]
    assert b"hidden" not in got.data and b"Bcc" not in got.data
    message = received(upstream)
    assert message["Subject"] == "Hello from PHP"
    assert message.get_payload() == "line one\n.\nline two\n".replace("\n", "\r\n")


def _git_send_email_missing() -> str | None:
    """Why git send-email cannot run here, or None."""
    if shutil.which("git") is None:
        return "needs git"
    probe = subprocess.run(["git", "send-email", "--help"], capture_output=True, check=False)
    if b"not a git command" in probe.stderr + probe.stdout:
        return "needs git send-email (Debian packages git-email, libmailtools-perl)"
    if subprocess.run(["perl", "-MMail::Address", "-e", "1"], capture_output=True,
                      check=False).returncode:
        return "git send-email needs Perl's Mail::Address (Debian: libmailtools-perl)"
    return None


async def test_php_mail_returns_false_when_relay_cannot_take_the_message(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """No relay listening and no queue file: mail() returns false (sendmail exited 75),
    and PHP's warning carries sendmail's reason; nothing is written."""
    php = shutil.which("php")
    if php is None:
        pytest.skip("needs php (php-cli, installed by .ci/run on CI)")
    config = write_config(tmp_path, upstream)
    script = 'exit(mail("to@example.com", "s", "b", "From: app@example.com") ? 0 : 3);'
    code, out = await sendmail("-d", f"sendmail_path={SENDMAIL} -t -i", "-r", script,
                               stdin=b"", config=config, program=php)
    assert code == 3, out
    assert "no relay is listening" in out
    assert not (tmp_path / "queue.sqlite3").exists()


async def test_git_send_email(tmp_path: Path, upstream: FakeUpstream,
                              start_relay: StartRelay) -> None:
    """git send-email --sendmail-cmd with --envelope-sender=auto: it runs
    `sendmail -i -f FROM RCPT...`."""
    missing = _git_send_email_missing()
    if missing:
        pytest.skip(missing)
    config, _ = await running(tmp_path, upstream, start_relay)
    repo = tmp_path / "repo"
    env = {**os.environ, "GIT_AUTHOR_NAME": "Dev", "GIT_AUTHOR_EMAIL": "dev@example.com",
           "GIT_COMMITTER_NAME": "Dev", "GIT_COMMITTER_EMAIL": "dev@example.com",
           "HOME": str(tmp_path), "RELAY_CONFIG": str(config)}

    def git_run(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True,
                              capture_output=True, text=True).stdout

    repo.mkdir()
    git_run("init", "-q")
    (repo / "file.txt").write_text("one\n.\n")
    git_run("add", "file.txt")
    git_run("commit", "-q", "-m", "Add a file")
    patch = git_run("format-patch", "-1", "-o", str(tmp_path / "out")).strip()
    proc = await asyncio.create_subprocess_exec(
        "git", "-C", str(repo), "send-email", f"--sendmail-cmd={SENDMAIL}",
        "--from=Dev <dev@example.com>", "--to=list@example.com", "--cc=cc@example.com",
        "--envelope-sender=auto", "--confirm=never", "--suppress-cc=self", "--quiet", patch,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (out + err).decode()
    await upstream.wait_for_messages(1)
    got = upstream.messages[0]
    assert got.mail_from == "dev@example.com"
    assert sorted(got.rcpt_tos) == ["cc@example.com", "list@example.com"]
    assert received(upstream)["Subject"] == "[PATCH] Add a file"


async def test_relay_down_the_message_lands_in_the_queue_and_the_next_start_sends_it(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    config = write_config(tmp_path, upstream)
    first = await start_relay(load_config(config))
    await first.shutdown(grace=1.0)  # the queue file exists; nothing listens now
    code, err = await sendmail("-v", "-f", "app@example.com", "to@example.com",
                               stdin=b"Subject: while down\n\nkept\n", config=config)
    assert code == 0, err
    assert "250 2.0.0 queued as" in err and "no relay is listening" in err
    # Without -v the same path says nothing (cron mails whatever a job prints).
    code, err = await sendmail("-t", stdin=b"To: other@example.com\nSubject: two\n\n2\n",
                               config=config)
    assert (code, err) == (0, "")
    assert upstream.messages == []
    await start_relay(load_config(config))
    await upstream.wait_for_messages(2)
    by_subject = {received(upstream, n)["Subject"]: upstream.messages[n].rcpt_tos
                  for n in range(2)}
    assert by_subject == {"while down": ("to@example.com",), "two": ("other@example.com",)}


async def test_the_dot_line_ends_the_input_before_the_pipe_closes(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """Without -i, a caller may end with a lone dot and wait for sendmail to exit before
    it closes the pipe: sendmail must not wait for the end of input."""
    config, _ = await running(tmp_path, upstream, start_relay)
    env = {**os.environ, "RELAY_CONFIG": str(config)}
    proc = await asyncio.create_subprocess_exec(
        SENDMAIL, "a@example.com", stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(b"Subject: dot\n\nbefore\n.\n")
    await proc.stdin.drain()  # and the pipe stays open
    try:
        assert await asyncio.wait_for(proc.wait(), 20) == 0, await proc.stderr.read()
    finally:
        proc.stdin.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await upstream.wait_for_messages(1)
    assert received(upstream)["Subject"] == "dot"


async def test_sendmail_reads_none_of_the_services_secrets(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Any user runs sendmail: a password from a variable set only in the service's
    environment, or a password file only the service can read, does not stop it."""
    config, _ = await running(tmp_path, upstream, start_relay)
    data = yaml.safe_load(config.read_text())
    monkeypatch.delenv("RELAY_TEST_SERVICE_ONLY", raising=False)
    data["accounts"]["other"] = {"host": "smtp.example.com", "username": "u",
                                 "password": "${RELAY_TEST_SERVICE_ONLY}"}
    data["accounts"]["third"] = {"host": "smtp.example.com", "username": "u",
                                 "password_file": str(tmp_path / "missing.secret")}
    config.write_text(yaml.safe_dump(data))
    assert await submit(["a@example.com"], b"Subject: no secrets\n\nx\n", config) == 0
    assert capsys.readouterr().err == ""
    await upstream.wait_for_messages(1)


async def test_relay_down_and_no_queue_is_a_temporary_failure(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    config = write_config(tmp_path, upstream)
    code, err = await sendmail("to@example.com", stdin=b"Subject: s\n\nx\n", config=config)
    assert code == 75
    assert "no relay is listening on 127.0.0.1:" in err and "there is no queue at" in err
    assert not (tmp_path / "queue.sqlite3").exists()  # nothing half-written


async def submit(argv: list[str], data: bytes, config: Path) -> int:
    """`relay sendmail` in this process (in a thread: smtplib blocks, and the relay runs
    in this loop); its exit code. stderr goes to capsys."""
    from relay.cli.sendmail import sendmail as run_sendmail

    return await asyncio.to_thread(run_sendmail, ["--config", str(config), *argv],
                                   io.BytesIO(data))


async def test_bad_input_exit_codes_name_the_cause(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str]) -> None:
    config, app = await running(tmp_path, upstream, start_relay)
    cases = [
        ([], b"Subject: s\n\nx\n", 64, "no recipients"),
        (["-t"], b"Subject: s\n\nx\n", 64, "no recipients"),
        (["a b@example.com"], b"x\n", 65, "bad recipient address 'a b@example.com'"),
        (["-f", "bad sender@x.org", "a@example.com"], b"x\n", 64, "-f takes one address"),
        (["-f", "bad@@x.org", "a@example.com"], b"x\n", 65, "bad sender address"),
        (["-Z"], b"", 64, "unknown option -Z"),
        # The listener's own answer to a message it can never take: 5xx, EX_DATAERR.
        (["a@example.com"], b"X-Account: nope\n\nx\n", 65,
         "relay refused the message: 550 5.7.1 X-Account header names unknown account"),
    ]
    for argv, data, code, says in cases:
        assert await submit(argv, data, config) == code, argv
        assert says in capsys.readouterr().err
    too_big = b"Subject: s\n\n" + b"x" * 80 + b"\n"
    small = tmp_path / "small.yaml"
    text = yaml.safe_load(config.read_text())
    text["listen"]["max_message_size"] = 1024
    small.write_text(yaml.safe_dump(text))
    assert await submit(["a@example.com"], too_big * 20, small) == 65
    assert "larger than listen.max_message_size (1024 bytes)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sendmail: {admin_address: nobody}\n")
    assert await submit(["a@example.com"], b"x\n", bad) == 78
    assert "sendmail.admin_address: must be one address" in capsys.readouterr().err
    bad.write_text("sendmail: {username: cron, password_file: /x}\n")
    assert await submit(["a@example.com"], b"x\n", bad) == 78
    assert ("sendmail.username: no user named 'cron' in listen.auth.users"
            in capsys.readouterr().err)
    assert app.metrics.received._value.get() == 0  # none of them was queued


async def test_a_temporary_refusal_is_ex_tempfail(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str]) -> None:
    config, app = await running(tmp_path, upstream, start_relay)
    app.handler.accepting = False  # DATA answers 421 4.3.2, as during a shutdown
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", config) == 75
    assert "421 4.3.2 Service shutting down" in capsys.readouterr().err


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
async def test_a_listener_that_wants_a_login(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str], tls: bool, request: pytest.FixtureRequest) -> None:
    """Without sendmail.username: 77 and the reply that says so; with it, a login (after
    STARTTLS when the listener has TLS); a wrong password: 77 again."""
    from relay.ingest.auth import hash_password

    path = write_config(tmp_path, upstream)
    data = yaml.safe_load(path.read_text())
    data["listen"]["auth"] = {"required": True,
                              "users": {"cron": {"password_hash": hash_password("pw")}}}
    if tls:
        cert, key = request.getfixturevalue("self_signed")
        data["listen"]["tls"] = {"cert": str(cert), "key": str(key)}
    path.write_text(yaml.safe_dump(data))
    await start_relay(load_config(path))
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", path) == 77
    assert "530 5.7.0 Authentication required" in capsys.readouterr().err
    secret = tmp_path / "sendmail.secret"
    secret.write_text("pw\n")
    data["sendmail"] = {"username": "cron", "password_file": str(secret)}
    path.write_text(yaml.safe_dump(data))
    assert await submit(["a@example.com"], b"Subject: logged in\n\nx\n", path) == 0
    await upstream.wait_for_messages(1)
    assert received(upstream)["Subject"] == "logged in"
    secret.write_text("wrong")
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", path) == 77
    err = capsys.readouterr().err
    assert "535 5.7.8" in err and "wrong" not in err


async def test_the_direct_write_checks_as_the_listener_does(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No relay listening: an unknown X-Account is refused as over SMTP, and nothing is
    written; a good message is, with X-Account honoured and removed."""
    path = write_config(tmp_path, upstream)
    data = yaml.safe_load(path.read_text())
    data["accounts"]["second"] = dict(data["accounts"]["up"])
    path.write_text(yaml.safe_dump(data))
    await (await start_relay(load_config(path))).shutdown(grace=1.0)
    assert await submit(["a@example.com"], b"X-Account: nope\n\nx\n", path) == 65
    assert "550 5.7.1 X-Account header names unknown account" in capsys.readouterr().err
    assert await submit(["-v", "a@example.com"], b"X-Account: second\nSubject: s\n\nx\n",
                        path) == 0
    assert "no relay is listening" in capsys.readouterr().err
    app = await start_relay(load_config(path))
    await upstream.wait_for_messages(1)
    assert b"X-Account" not in upstream.messages[0].data
    rows = await app.store.list_messages()
    assert [m.account for m in rows] == ["second"]


async def test_the_direct_write_keeps_the_listeners_login_rules_and_reads_no_password(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """No relay listening, a listener that requires AUTH: without sendmail.username the
    answer is the listener's 530 (77), with it the message is queued as that user, and
    that user's account list holds. No listener password is read: the users' variables
    and files exist only for the service."""
    from relay.ingest.auth import hash_password

    path = write_config(tmp_path, upstream)
    data = yaml.safe_load(path.read_text())
    data["accounts"]["second"] = dict(data["accounts"]["up"])
    data["listen"]["auth"] = {"required": True, "users": {
        "cron": {"password_hash": hash_password("pw"), "accounts": ["up"]}}}
    path.write_text(yaml.safe_dump(data))
    await (await start_relay(load_config(path))).shutdown(grace=1.0)
    monkeypatch.delenv("RELAY_TEST_WEB_PASSWORD", raising=False)
    data["listen"]["auth"]["users"]["web"] = {"password_env": "RELAY_TEST_WEB_PASSWORD"}
    data["listen"]["auth"]["users"]["ops"] = {"password_file": str(tmp_path / "nope")}
    path.write_text(yaml.safe_dump(data))
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", path) == 77
    assert "530 5.7.0 Authentication required" in capsys.readouterr().err
    (tmp_path / "sendmail.secret").write_text("pw")  # not checked: no listener to ask
    data["sendmail"] = {"username": "cron", "password_file": str(tmp_path / "sendmail.secret")}
    path.write_text(yaml.safe_dump(data))
    assert await submit(["a@example.com"], b"X-Account: second\n\nx\n", path) == 65
    assert "550 5.7.1 This user may not send through that account" in capsys.readouterr().err
    assert await submit(["a@example.com"], b"Subject: as cron\n\nx\n", path) == 0
    del data["listen"]["auth"]["users"]["web"], data["listen"]["auth"]["users"]["ops"]
    path.write_text(yaml.safe_dump(data))
    await start_relay(load_config(path))
    await upstream.wait_for_messages(1)
    assert received(upstream)["Subject"] == "as cron"


async def test_bp_lists_and_q_flushes(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, upstream)
    data = yaml.safe_load(config.read_text())
    data["retry"].update(initial_delay="1h", max_delay="1h")  # deferred until flushed
    config.write_text(yaml.safe_dump(data))
    app = await start_relay(load_config(config))
    upstream.fail_data(451, "4.3.0 try later")
    assert await submit(["-f", "app@example.com", "to@example.com"], b"Subject: s\n\nx\n",
                        config) == 0
    await wait_until(lambda: metric(app, "relay_messages_deferred_total", account="up") > 0,
                     what="a deferred attempt")
    capsys.readouterr()
    mailq = tmp_path / "mailq"
    mailq.symlink_to(SENDMAIL)  # what a package's /usr/bin/mailq link does
    code, listing = await sendmail(stdin=b"", config=config, program=str(mailq))
    assert code == 0, listing
    header, row = listing.splitlines()[:2]
    assert row.startswith(app_id := row.split()[0]) and len(app_id) == 22
    assert header.index("STATE") == row.index("deferred")  # columns line up
    assert "<app@example.com> -> to@example.com" in row
    assert await submit(["-q"], b"", config) == 0
    assert "1 deferred message(s) due now" in capsys.readouterr().out
    await upstream.wait_for_messages(1)
    await app.scheduler.run_until_idle()
    assert await submit(["-bp"], b"", config) == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"


def test_relay_sendmail_is_the_same_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`relay sendmail ...` reaches sendmail's own option parser (argparse would take
    -FCronDaemon for an error), and `relay --help` lists it."""
    from relay.cli import main

    assert main(["sendmail", "--help"]) == 0
    assert "-FCronDaemon" not in (usage := capsys.readouterr().out) and "-t " in usage
    assert main(["sendmail", "-FCronDaemon", "-bx"]) == 64
    assert "unsupported: -bx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "sendmail" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (what a root crontab runs as)")
async def test_as_root_the_direct_write_is_the_queue_owners_or_none(
        upstream: FakeUpstream, start_relay: StartRelay) -> None:
    """Run by root with no relay listening, sendmail writes as the queue's owner, so no
    file beside the queue is root's (the service could not open it). Where that owner
    cannot reach the file (a parent closed to it, as systemd's DynamicUser does with
    /var/lib/private) it writes nothing (75): as root it would follow the symlinks the
    owner planted there and create root's files anywhere (a1 #3)."""
    base = Path(tempfile.mkdtemp(prefix="relay-sendmail-", dir="/tmp"))  # not tmp_path:
    try:  # pytest's tmp directories are closed (0700) to every user but root
        os.chmod(base, 0o755)
        config = write_config(base, upstream)
        data = yaml.safe_load(config.read_text())
        data["queue"]["path"] = str(base / "q" / "queue.sqlite3")
        config.write_text(yaml.safe_dump(data))
        await (await start_relay(load_config(config))).shutdown(grace=1.0)
        nobody, q, victim = 65534, base / "q", base / "victim"
        victim.mkdir()

        def restored() -> None:
            """As after a restore from `relay queue backup`: the queue file alone, so
            that sendmail creates the lock files and the owners' folder beside it."""
            for extra in q.glob("queue.sqlite3?*"):
                if extra.is_dir() and not extra.is_symlink():
                    shutil.rmtree(extra)
                else:
                    extra.unlink()
            for path in [q, *q.rglob("*")]:
                os.chown(path, nobody, nobody)

        restored()
        code, err = await sendmail("to@example.com", stdin=b"Subject: 0\n\nx\n",
                                   config=config)
        assert code == 0, err
        owners = {p.name: p.stat().st_uid for p in [q, *q.rglob("*")]}
        assert set(owners.values()) == {nobody}, owners
        restored()
        (q / "queue.sqlite3.write-lock").symlink_to(victim / "created-by-root")
        (q / "queue.sqlite3.owners").symlink_to(victim)
        for planted in q.glob("queue.sqlite3.*"):
            os.lchown(planted, nobody, nobody)
        os.chmod(base, 0o700)
        code, err = await sendmail("to@example.com", stdin=b"Subject: 1\n\nx\n",
                                   config=config)
        assert code == 75, err
        assert "only as its owner (uid 65534)" in err and "nothing was written" in err
        assert list(victim.iterdir()) == []
        assert {p.lstat().st_uid for p in [q, *q.rglob("*")]} == {nobody}
        os.chmod(base, 0o755)
        restored()
        await start_relay(load_config(config))
        await upstream.wait_for_messages(1)
        assert received(upstream)["Subject"] == "0"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_check_config_warns_of_a_world_readable_sendmail_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main

    secret = tmp_path / "sendmail.secret"
    secret.write_text("pw")
    config = tmp_path / "relay.yaml"
    hashed = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"  # (never checked here)
    config.write_text(yaml.safe_dump({
        "listen": {"auth": {"users": {"cron": {"password_hash": hashed}}}},
        "sendmail": {"username": "cron", "password_file": str(secret)}}))
    for mode, warned in ((0o640, False), (0o644, True)):
        secret.chmod(mode)
        assert main(["check-config", "-c", str(config)]) == 0
        err = capsys.readouterr().err
        assert ("sendmail.password_file: " in err and "readable by every user" in err) is warned


# A local user squatting the listener's port while relay is down (a1 #1): it greets and
# says yes to everything, and prints what it is sent.
SQUATTER = r"""
import os, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
os.setgid(65534); os.setuid(65534)  # the socket is still root's: make one as nobody
sock.close()
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(1)
print(sock.getsockname()[1], flush=True)
conn, _ = sock.accept()
conn.sendall(b"220 relay ESMTP\r\n")
for line in conn.makefile("rb"):
    print("GOT", line, flush=True)
    if line.upper().startswith(b"EHLO"):
        conn.sendall(b"250-relay\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
    elif line.upper().startswith(b"QUIT"):
        conn.sendall(b"221 bye\r\n")
        break
    else:
        conn.sendall(b"250 ok\r\n")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/proc/net/tcp"),
                    reason="needs root (to listen as another user) and Linux's /proc")
@pytest.mark.parametrize("login", [True, False], ids=["login", "no-login"])
async def test_a_port_squatted_by_another_user_gets_neither_password_nor_mail(
        tmp_path: Path, upstream: FakeUpstream, login: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    """relay down, another user listening on its port: sendmail checks the listener's
    owner before it sends a byte, exits 75 naming the port and the owner."""
    squatter = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SQUATTER, stdout=subprocess.PIPE)
    try:
        assert squatter.stdout is not None
        port = int(await asyncio.wait_for(squatter.stdout.readline(), 10))
        config = write_config(tmp_path, upstream, listen_port=port)
        data = yaml.safe_load(config.read_text())
        if login:
            secret = tmp_path / "sendmail.secret"
            secret.write_text("hunter2\n")
            data["listen"]["auth"] = {"required": True, "users": {"cron": {
                "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"}}}
            data["sendmail"] = {"username": "cron", "password_file": str(secret)}
        config.write_text(yaml.safe_dump(data))
        assert await submit(["a@example.com"], b"Subject: s\n\nsecret mail\n", config) == 75
        err = capsys.readouterr().err
        assert f"127.0.0.1:{port} is held by user nobody (uid 65534)" in err
        got = (await asyncio.wait_for(squatter.stdout.read(), 10)).decode()
        assert "AUTH" not in got.upper() and "MAIL" not in got.upper(), got
        assert "secret mail" not in got
    finally:
        if squatter.returncode is None:
            squatter.kill()
        await squatter.wait()


async def test_where_the_listeners_owner_is_unknown_the_password_needs_verified_tls(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str], self_signed: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No /proc to ask (not Linux): the password goes only over STARTTLS verified against
    listen.tls.cert; a listener whose certificate is another one gets nothing."""
    from relay.cli import peer
    from relay.ingest.auth import hash_password

    monkeypatch.setattr(peer, "PROC_TABLES", ())
    cert, key = self_signed
    path = write_config(tmp_path, upstream)
    data = yaml.safe_load(path.read_text())
    data["listen"]["auth"] = {"required": True,
                              "users": {"cron": {"password_hash": hash_password("pw")}}}
    data["listen"]["tls"] = {"cert": str(cert), "key": str(key)}
    secret = tmp_path / "sendmail.secret"
    secret.write_text("pw\n")
    data["sendmail"] = {"username": "cron", "password_file": str(secret)}
    path.write_text(yaml.safe_dump(data))
    await start_relay(load_config(path))
    assert await submit(["a@example.com"], b"Subject: verified\n\nx\n", path) == 0
    await upstream.wait_for_messages(1)
    other = tmp_path / "other"
    other.mkdir()
    await asyncio.to_thread(
        subprocess.run, ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                         "1", "-subj", "/CN=localhost", "-keyout", str(other / "k.pem"),
                         "-out", str(other / "c.pem")], check=True, capture_output=True)
    data["listen"]["tls"] = {"cert": str(other / "c.pem"), "key": str(other / "k.pem")}
    path.write_text(yaml.safe_dump(data))  # what sendmail trusts is not what it serves
    capsys.readouterr()
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", path) == 75
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    del data["listen"]["tls"]
    path.write_text(yaml.safe_dump(data))
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", path) == 75
    assert "listen.tls.cert is not set" in capsys.readouterr().err
    assert len(upstream.messages) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to give the file to another user)")
async def test_a_config_another_user_owns_or_anyone_may_write_is_not_read(
        tmp_path: Path, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """a1 #2: a web visitor adding --config=UPLOADED through PHP's mail(), run by root,
    would choose the password file and where it goes: 78, naming the file and why."""
    config = write_config(tmp_path, upstream)
    os.chown(config, 65534, 65534)
    assert await submit(["a@example.com"], b"Subject: s\n\nx\n", config) == 78
    assert (f"--config {config}: owned by user nobody (uid 65534): sendmail reads only"
            " a config owned by root or by its caller") in capsys.readouterr().err
    monkeypatch.setenv("RELAY_CONFIG", str(config))
    from relay.cli.sendmail import sendmail as run_sendmail
    assert run_sendmail(["a@example.com"], io.BytesIO(b"x\n")) == 78
    assert f"RELAY_CONFIG {config}: owned by" in capsys.readouterr().err
    os.chown(config, 0, 0)
    config.chmod(0o646)
    assert run_sendmail(["-bp"], io.BytesIO(b"")) == 78
    assert "writable by every user" in capsys.readouterr().err


@pytest.mark.parametrize("planted", ["queue.sqlite3.write-lock", "queue.sqlite3.lock",
                                     "queue.sqlite3.owners"])
async def test_the_files_beside_the_queue_are_never_opened_through_a_symlink(
        tmp_path: Path, planted: str) -> None:
    """Whoever can write the queue's folder could point a lock file or the owners'
    folder at any file; `relay sendmail` run by root would create or lock it (a1 #3).
    The store refuses, naming the file, and creates nothing there."""
    from relay.errors import StoreError
    from relay.queue.sqlite.store import SQLiteStore

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / planted).symlink_to(elsewhere if planted.endswith("owners")
                                    else elsewhere / "created")
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    with pytest.raises(StoreError, match=f"cannot create {tmp_path / planted}"):
        await store.open()
    await store.close()
    assert list(elsewhere.iterdir()) == []


async def test_names_and_addresses_beyond_ascii(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay,
        capsys: pytest.CaptureFixture[str]) -> None:
    """a1 #11: -F in Latin-1 (an old locale's bytes, which Python's argv keeps as
    surrogates) becomes an RFC 2047 name; -f in UTF-8 goes with SMTPUTF8; an address in
    Latin-1 is 65 with a message, never a traceback."""
    config, _ = await running(tmp_path, upstream, start_relay)
    latin1_name = os.fsdecode(b"Jos\xe9")
    assert await submit(["-F", latin1_name, "a@example.com"], b"Subject: s\n\nx\n",
                        config) == 0
    await upstream.wait_for_messages(1)
    raw_from = received(upstream)["From"]
    assert raw_from.startswith("=?utf-8?")
    assert str(email.header.make_header(email.header.decode_header(raw_from))).startswith(
        "José <")
    assert await submit(["-F", "Jérôme", "-f", "jérôme@example.com", "a@example.com"],
                        b"Subject: s\n\nx\n", config) == 0
    assert await submit(["-f", os.fsdecode(b"j\xf6s@example.com"), "a@example.com"],
                        b"Subject: s\n\nx\n", config) == 65
    assert ("bad sender address b'j\\xf6s@example.com': not UTF-8"
            in capsys.readouterr().err)


@pytest.mark.parametrize("down", [False, True], ids=["listener", "direct-write"])
async def test_more_recipients_than_a_transaction_takes_go_in_several(
        tmp_path: Path, upstream: FakeUpstream, start_relay: StartRelay, down: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    """a1 #10: more than listen.max_recipients recipients exited 75 forever; they go in
    transactions of at most that many (RFC 5321 3.3), over SMTP or into the queue."""
    config = write_config(tmp_path, upstream)
    data = yaml.safe_load(config.read_text())
    data["listen"]["max_recipients"] = 3
    config.write_text(yaml.safe_dump(data))
    app = await start_relay(load_config(config))
    if down:
        await app.shutdown(grace=1.0)
    everyone = [f"r{n}@example.com" for n in range(7)]
    assert await submit(["-v", *everyone], b"Subject: many\n\nx\n", config) == 0
    assert capsys.readouterr().err.count("250 2.0.0 queued as") == 3
    if down:
        await start_relay(load_config(config))
    await wait_until(lambda: len(upstream.recipients_received()) >= 7)
    assert sorted(upstream.recipients_received()) == everyone


def test_who_may_run_the_listener(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Root, the caller, the queue file's owner (when the caller can see it) and
    sendmail.listener_user, by name or uid (the systemd unit's user, whose queue
    folder other users cannot see into); an unknown name adds nobody."""
    from relay.cli.sendmail import _relay_uids

    config = write_config(tmp_path, upstream)
    data = yaml.safe_load(config.read_text())
    for user, extra in (("nobody", {65534}), ("4242", {4242}), ("no-such-user", set())):
        data["sendmail"] = {"listener_user": user}
        config.write_text(yaml.safe_dump(data))
        assert _relay_uids(load_config(config)) == {0, os.getuid(), *extra}
