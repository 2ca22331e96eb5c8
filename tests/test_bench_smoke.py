"""`relay bench --quick` with tiny counts, without Postfix: it runs and prints figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_bench_prints_figures_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "bench",
            "--quick",
            "--no-postfix",
            "--load",
            "builtin",
            "--sink",
            "aiosmtpd",
            "--sessions",
            "4",
            "--messages",
            "30",
            "--e2e-messages",
            "40",
            "--queued",
            "50",
            "--size",
            "2000",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for label in (
        "(1) ingest, 1 conn/msg",
        "(2) ingest, persistent",
        "(3) end-to-end",
        "(4) ack p99",
        "RSS after end-to-end run",
        "start-up",
    ):
        assert label in proc.stdout
    report = json.loads(out.read_text())
    figures = report["figures"]
    assert figures["ingest_conn"]["relay"]["rate"] > 0
    assert figures["ingest_sess"]["ratio_bare"] > 0
    assert figures["e2e"]["relay"]["rate"] > 0
    assert figures["ack"]["relay"]["p99_ms"] > 0
    assert figures["ack"]["ratio_relay_per_message"] > 0
    assert report["queued"]["in_queue"] == 50 and report["queued"]["startup_s"] > 0
    assert report["delivered"]["messages"] == 2000 and report["delivered"]["scrape_max_ms"] > 0
    assert "(6) 2,000 delivered records kept" in proc.stdout
    assert report["tools"]["postfix"] is None
    assert all(s["verified"] is not False and not s["error"] for s in report["samples"])
