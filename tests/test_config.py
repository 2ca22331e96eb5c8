"""The config file: one clear line per problem (key path first), durations, masking, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relay.cli import commands as cli
from relay.config.durations import parse_duration
from relay.config.loading import load_config, parse_config
from relay.config.report import config_warnings
from relay.config.schema import PoolConfig, RateLimitConfig
from relay.errors import ConfigError

GMAIL = "accounts:\n  gmail:\n    host: smtp.gmail.com\n"
ROUTE_GMAIL = "routing:\n  default_account: gmail\n"
UNSET_ENV = "RELAY_TEST_SURELY_UNSET_PASSWORD"

# (config text, the one problem it must report, exactly)
BAD_CONFIGS = {
    "bad tls": (
        GMAIL + "    tls: ssl\n" + ROUTE_GMAIL,
        "accounts.gmail.tls: must be one of starttls, implicit, none",
    ),
    "unknown default account": (
        "routing:\n  default_account: x\n",
        "routing.default_account: no account named 'x' (accounts: outbox)",
    ),
    "unknown key": (
        "listen:\n  hots: 127.0.0.1\n",
        "listen.hots: unknown key",
    ),
    "unknown top-level key": (
        "acounts: {}\n",
        "acounts: unknown key",
    ),
    "bad duration": (
        "retry:\n  initial_delay: 30 parsecs\n",
        "retry.initial_delay: must be a duration such as 500ms, 30s, 5m, 2h, 2d or a number"
        " of seconds, not '30 parsecs'",
    ),
    "negative duration": (
        "listen:\n  timeout: -5\n",
        "listen.timeout: must not be negative",
    ),
    "unset password_env": (
        GMAIL + f"    username: me\n    password_env: {UNSET_ENV}\n" + ROUTE_GMAIL,
        f"accounts.gmail.password_env: environment variable {UNSET_ENV} is not set",
    ),
    "zero pool size": (
        GMAIL + "    pool:\n      max_connections: 0\n" + ROUTE_GMAIL,
        "accounts.gmail.pool.max_connections: must be at least 1",
    ),
    "negative pool size": (
        GMAIL + "    pool:\n      max_connections: -3\n" + ROUTE_GMAIL,
        "accounts.gmail.pool.max_connections: must be at least 1",
    ),
    "port not a number": (
        "listen:\n  port: smtp\n",
        "listen.port: must be a whole number",
    ),
    "port too big": (
        "listen:\n  port: 70000\n",
        "listen.port: must be at most 65535",
    ),
    "smtp account without host": (
        "accounts:\n  gmail:\n    tls: starttls\n" + ROUTE_GMAIL,
        "accounts.gmail.host: required for an smtp account",
    ),
    "two password sources": (
        GMAIL + "    username: me\n    password: a\n    password_file: /nonexistent\n"
        + ROUTE_GMAIL,
        "accounts.gmail.password: give only one of password_file, password",
    ),
    # An account's retry block is checked merged with the top-level one (issue 19.1).
    "account initial_delay beyond the merged max_delay": (
        "retry:\n  max_delay: 20m\n" + GMAIL + "    retry:\n      initial_delay: 45m\n"
        + ROUTE_GMAIL,
        "accounts.gmail.retry.initial_delay: must be at most max_delay in the merged policy,"
        " which has initial_delay 45m (accounts.gmail.retry) and max_delay 20m"
        " (top-level retry)",
    ),
    "account max_delay below the merged initial_delay": (
        "retry:\n  initial_delay: 10m\n  max_delay: 1h\n" + GMAIL
        + "    retry:\n      max_delay: 5m\n" + ROUTE_GMAIL,
        "accounts.gmail.retry.max_delay: must be at least initial_delay in the merged policy,"
        " which has initial_delay 10m (top-level retry) and max_delay 5m"
        " (accounts.gmail.retry)",
    ),
    "not a mapping": (
        "- listen\n- queue\n",
        "(top level): must be a mapping of keys to values",
    ),
}


# Problems only the commands that read secrets (serve, accounts test) fail on (issue 20).
SECRETS_ONLY_FOR_SERVE = {"unset password_env"}


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNSET_ENV, raising=False)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- one clear line per problem


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_gives_one_line_naming_the_key(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`relay check-config` and `relay serve` print exactly one 'config error: key: why' line."""
    text, problem = BAD_CONFIGS[case]
    if command == "check-config" and case in SECRETS_ONLY_FOR_SERVE:
        command = "serve"  # check-config only notes it (tests/test_operations.py)
    path = write(tmp_path, text)
    code, out, err = run_cli([command, "--config", str(path)], capsys)
    assert code == 2
    assert err.splitlines() == [f"config error: {problem}"]
    assert out == ""
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises_config_error_with_the_same_line(case: str, tmp_path: Path) -> None:
    """load_config and parse_config raise ConfigError whose problems are that one line."""
    text, problem = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as from_file:
        load_config(write(tmp_path, text))
    assert from_file.value.problems == [problem]
    with pytest.raises(ConfigError) as from_data:
        parse_config(yaml.safe_load(text))
    assert from_data.value.problems == [problem]


def test_yaml_syntax_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML syntax error is reported as file:line:column, not as a parser traceback."""
    path = write(tmp_path, "listen:\n  host: 127.0.0.1\n   port: 2525\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    [problem] = exc.value.problems
    assert problem.startswith(f"{path}:3:")
    assert "invalid YAML" in problem
    code, out, err = run_cli(["check-config", "--config", str(path)], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"config error: {problem}"]


def test_missing_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config path that does not exist is reported, not raised."""
    path = tmp_path / "nope.yaml"
    code, _, err = run_cli(["check-config", "--config", str(path)], capsys)
    assert code == 2
    assert err.splitlines() == [
        f"config error: {path}: cannot read config file: No such file or directory"
    ]


def test_several_problems_give_several_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem in the file is listed at once, one line each."""
    text = (
        "foo: 1\n"
        "listen:\n  port: -1\n"
        "retry:\n  initial_delay: 30 parsecs\n"
        "accounts:\n"
        "  gmail:\n    host: smtp.gmail.com\n    tls: ssl\n    pool: {max_connections: 0}\n"
        "  box:\n    transport: maildir\n    path: out\n    bogus: 1\n"
    )
    path = write(tmp_path, text)
    code, out, err = run_cli(["check-config", "--config", str(path)], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert all(line.startswith("config error: ") for line in lines)
    keys = {line.removeprefix("config error: ").split(": ", 1)[0] for line in lines}
    assert keys == {
        "foo",
        "listen.port",
        "retry.initial_delay",
        "accounts.gmail.tls",
        "accounts.gmail.pool.max_connections",
        "accounts.box.bogus",
    }
    assert len(lines) == len(keys)


# -- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("2d", 172_800.0),
        ("1.5h", 5400.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_durations_parse_to_seconds(value: object, seconds: float) -> None:
    """Durations take ms/s/m/h/d suffixes or plain numbers (seconds)."""
    config = parse_config({"queue": {"keep_delivered": value}})  # (a key where 0 is allowed)
    assert config.queue.keep_delivered == seconds


@pytest.mark.parametrize("value", ["30 parsecs", "-5s", "5 minutes", "", "m", True, [5],
                                   float("inf"), float("nan"), ".inf"])
def test_bad_durations_name_the_key(value: object) -> None:
    """Anything else is a config error on that key."""
    with pytest.raises(ConfigError) as exc:
        parse_config({"listen": {"timeout": value}})
    [problem] = exc.value.problems
    assert problem.startswith("listen.timeout: ")


# -- check-config


def test_check_config_masks_every_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The effective config shows password as ******** and never prints any secret."""
    secrets = {
        "literal": "Lit-secret-4e1b9",
        "env": "Env-secret-77aa0",
        "file": "File-secret-c0ffee",
    }
    monkeypatch.setenv("RELAY_TEST_PW", secrets["env"])
    secret_file = tmp_path / "pw"
    secret_file.write_text(secrets["file"] + "\n")
    secret_file.chmod(0o600)
    account = "    host: smtp.example.com\n    username: me@example.com\n"
    text = (
        "accounts:\n"
        f"  literal:\n{account}    password: {secrets['literal']}\n"
        f"  env:\n{account}    password_env: RELAY_TEST_PW\n"
        f"  file:\n{account}    password_file: {secret_file}\n"
        "routing:\n  default_account: env\n"
    )
    config = load_config(write(tmp_path, text))
    assert {n: a.secret for n, a in config.accounts.items()} == secrets  # they were read

    code, out, err = run_cli(["check-config", "--config", str(tmp_path / "relay.yaml")], capsys)
    assert code == 0
    for secret in secrets.values():
        assert secret not in out
        assert secret not in err
    shown = yaml.safe_load(out)
    assert shown["accounts"]["literal"]["password"] == "********"
    assert shown["accounts"]["env"]["password_env"] == "RELAY_TEST_PW"
    assert shown["accounts"]["env"]["port"] == 587  # the starttls default, filled in
    assert shown["routing"]["default_account"] == "env"
    assert "warning: accounts.literal.password:" in err


def test_check_config_masks_listener_password_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listener user's argon2 hash lets a password be guessed offline: masked too."""
    from relay.ingest.auth import hash_password

    digest = hash_password("listener-pw")
    text = ("listen:\n  auth:\n    users:\n"
            f"      app:\n        password_hash: '{digest}'\n")
    code, out, err = run_cli(["check-config", "--config", str(write(tmp_path, text))], capsys)
    assert code == 0
    assert digest not in out + err and "$argon2" not in out + err
    assert yaml.safe_load(out)["listen"]["auth"]["users"]["app"]["password_hash"] == "********"


def test_check_config_without_file_prints_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No --config and no $RELAY_CONFIG: the built-in defaults, as YAML."""
    code, out, _ = run_cli(["check-config"], capsys)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["listen"]["port"] == 2525
    assert shown["accounts"]["outbox"]["transport"] == "maildir"
    assert shown["retry"]["initial_delay"] == "30s"


# -- an account's retry block: merged over the top-level one, everywhere (issue 19.1)

MERGED_RETRY = """\
retry:
  initial_delay: 2m
  max_delay: 2h
accounts:
  short-lived:
    transport: maildir
    path: outbox
    retry:
      max_age: 1d
  slow-start:
    transport: maildir
    path: outbox
    retry:
      initial_delay: 45m
  plain:
    transport: maildir
    path: outbox
routing:
  default_account: plain
"""


def test_account_retry_block_overrides_only_the_keys_it_sets() -> None:
    """initial_delay 45m is valid under a top-level max_delay 2h, though not under 30m."""
    config = parse_config(yaml.safe_load(MERGED_RETRY))
    policy = {name: config.retry_for(name).model_dump() for name in config.accounts}
    assert policy == {
        "short-lived": {"initial_delay": 120.0, "max_delay": 7200.0, "max_age": 86400.0,
                        "jitter": 0.2},
        "slow-start": {"initial_delay": 2700.0, "max_delay": 7200.0, "max_age": 172800.0,
                       "jitter": 0.2},
        "plain": {"initial_delay": 120.0, "max_delay": 7200.0, "max_age": 172800.0,
                  "jitter": 0.2},
    }


def test_check_config_prints_each_accounts_merged_retry_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What check-config shows for an account is the policy its deliveries run with."""
    path = write(tmp_path, MERGED_RETRY)
    code, out, err = run_cli(["check-config", "--config", str(path)], capsys)
    assert (code, err) == (0, "")
    shown = yaml.safe_load(out)
    assert shown["accounts"]["short-lived"]["retry"] == {
        "initial_delay": "2m", "max_delay": "2h", "max_age": "1d", "jitter": 0.2}
    assert shown["accounts"]["slow-start"]["retry"] == {
        "initial_delay": "45m", "max_delay": "2h", "max_age": "2d", "jitter": 0.2}
    assert shown["accounts"]["plain"]["retry"] == shown["retry"]
    config = load_config(path)
    for name, account in shown["accounts"].items():
        runs = config.retry_for(name)
        printed = account["retry"]
        assert [parse_duration(printed[k]) for k in ("initial_delay", "max_delay", "max_age")] \
            == [runs.initial_delay, runs.max_delay, runs.max_age], name
        assert printed["jitter"] == runs.jitter


# -- defaults and warnings


def test_partial_pool_and_rate_limit_blocks_take_defaults() -> None:
    """Keys missing from pool/rate_limit blocks get their defaults."""
    config = parse_config({
        "accounts": {"up": {"host": "smtp.example.com", "pool": {"max_connections": 2},
                            "rate_limit": {"per_minute": 10}}},
        "routing": {"default_account": "up"},
    })
    acc = config.accounts["up"]
    pool_defaults, rate_defaults = PoolConfig(), RateLimitConfig()
    assert acc.pool.max_connections == 2
    assert acc.pool.max_messages_per_connection == pool_defaults.max_messages_per_connection
    assert acc.pool.idle_timeout == pool_defaults.idle_timeout == 300.0
    assert acc.rate_limit.per_minute == 10
    assert acc.rate_limit.per_second is None and acc.rate_limit.per_day is None
    assert acc.rate_limit.on_limit == rate_defaults.on_limit == "defer"
    assert acc.rate_limit.windows() == [(60.0, 10)]


def _smtp_config(host: str, **extra: object) -> dict[str, object]:
    account = {"host": host, "tls": "none", "username": "me", "password_env": "RELAY_TEST_PW",
               **extra}
    return {"accounts": {"up": account}, "routing": {"default_account": "up"}}


def test_plaintext_password_to_remote_host_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    """tls: none with a username towards a non-loopback host is a warning."""
    monkeypatch.setenv("RELAY_TEST_PW", "x")
    warnings = config_warnings(parse_config(_smtp_config("smtp.example.com")))
    assert any(w.startswith("accounts.up.tls: none") and "smtp.example.com" in w
               for w in warnings), warnings


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_plaintext_password_to_loopback_is_not_warned(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On loopback, tls: none is fine (a local test server or tunnel)."""
    monkeypatch.setenv("RELAY_TEST_PW", "x")
    warnings = config_warnings(parse_config(_smtp_config(host)))
    assert not any(w.startswith("accounts.up.tls") for w in warnings), warnings


def test_check_config_masks_passwords_and_secret_query_values_in_every_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token endpoint's userinfo password and a webhook's ?token= are credentials too."""
    text = (
        "accounts:\n  mail:\n    host: smtp.example.com\n    username: me@example.com\n"
        "    auth:\n      mechanism: xoauth2\n      client_id: app\n"
        "      token_url: https://u:Tok-pw-91c2@auth.example.com/token?tenant=t\n"
        "      refresh_token_env: HOME\n"
        "routing:\n  default_account: mail\n"
        "events:\n  webhooks:\n"
        "    - url: https://hooks.example.com/h?team=ops&token=Hook-tok-5d1e&X-Amz-Signature=S1g\n"
        "      secret_env: HOME\n"
        "    - url: https://hooks.example.com:8443/h?api_key=Hook-key-aa07\n"
        "      secret_env: HOME\n"
    )
    code, out, err = run_cli(["check-config", "--config", str(write(tmp_path, text))], capsys)
    assert code == 0, err
    for secret in ("Tok-pw-91c2", "Hook-tok-5d1e", "S1g", "Hook-key-aa07"):
        assert secret not in out + err
    shown = yaml.safe_load(out)
    assert shown["accounts"]["mail"]["auth"]["token_url"] == (
        "https://u:***@auth.example.com/token?tenant=t")
    assert [h["url"] for h in shown["events"]["webhooks"]] == [
        "https://hooks.example.com/h?team=ops&token=***&X-Amz-Signature=***",
        "https://hooks.example.com:8443/h?api_key=***"]
