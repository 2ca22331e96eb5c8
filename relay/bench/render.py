"""`relay bench`'s report: the machine it ran on and the table it prints."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from relay.bench.sink import (
    find_tool,
)
from relay.bench.stats import BARE, CASES, PER_MESSAGE, POSTFIX, RELAY, RELAY_WORKERS, SCRAPES

# -- output -------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def render(report: dict[str, Any]) -> str:
    f, opts, queued = report["figures"], report["options"], report["queued"]
    head = (
        f"relay bench: {opts['rounds']} round(s); {opts['messages']:,} messages per case, "
        f"{opts['e2e_messages']:,} end-to-end; {opts['size']:,}-byte payload; "
        f"{opts['sessions']} sessions\n"
        f"load: {report['tools']['load']} (ack latency: built-in client); "
        f"sink: {report['tools']['sink']}; postfix: "
        f"{report['tools']['postfix'] or 'not measured'}\n"
    )
    workers = opts.get("workers_resolved") or 1
    cols = ["relay", f"{workers} workers", "per-msg commit", "bare aiosmtpd", "postfix", "÷bare",
            "÷postfix", "÷per-msg"]
    lines = [f"{'figure (median of rounds)':<38}" + "".join(f"{c:>15}" for c in cols)]

    def row(label: str, entry: dict[str, Any], attr: str, digits: int) -> None:
        cells = [
            _num((entry.get(s) or {}).get(attr), digits)
            for s in (RELAY, RELAY_WORKERS, PER_MESSAGE, BARE, POSTFIX)
        ]
        cells += [_num(entry.get(f"ratio_{b}"), 2) for b in (BARE, POSTFIX, PER_MESSAGE)]
        lines.append(f"{label:<38}" + "".join(f"{c:>15}" for c in cells))

    row("(1) ingest, 1 conn/msg (msgs/s)", f["ingest_conn"], "rate", 0)
    row("(2) ingest, persistent (msgs/s)", f["ingest_sess"], "rate", 0)
    row("(3) end-to-end (msgs/s)", f["e2e"], "rate", 0)
    row(
        "    its ingest while delivering",
        {k: v for k, v in f["e2e"].items() if not k.startswith("ratio")},
        "ingest_rate",
        0,
    )
    ack = f["ack"]
    for q in ("p50", "p90", "p99"):
        entry = ack if q == "p99" else {k: v for k, v in ack.items() if not k.startswith("ratio")}
        row(f"(4) ack {q} (ms)", entry, f"{q}_ms", 1)
    lines.append("")
    cpu = f["relay_cpu_ms_per_msg"]
    lines.append(
        "relay CPU per message (ms): " + ", ".join(f"{case} {_num(cpu[case], 2)}" for case in CASES)
    )
    lines.append(
        f"(5) relay RSS after end-to-end run: {_num(f['rss_after_e2e_mb'], 1)} MB; "
        f"start-up, fresh queue: {_num(f['relay_startup_s'], 2)} s"
    )
    if queued:
        lines.append(
            f"    {queued['messages']:,} queued (delivery paused; "
            f"{_num(queued.get('queue_file_mb'), 0)} MB file, filled at "
            f"{_num(queued.get('fill_rate'), 0)} msgs/s): RSS "
            f"{_num(queued.get('rss_after_fill_mb'), 1)} MB after filling, "
            f"{_num(queued.get('rss_after_restart_mb'), 1)} MB after restart;"
            f" start-up {_num(queued.get('startup_s'), 2)} s"
        )
        if queued.get("error"):
            lines.append(f"    error: {queued['error']}")
    delivered = report.get("delivered")
    if delivered:
        lines.append(
            f"(6) {delivered['messages']:,} delivered records kept"
            f" ({_num(delivered.get('queue_file_mb'), 0)} MB file): GET /metrics"
            f" {_num(delivered.get('scrape_p50_ms'), 1)} ms median,"
            f" {_num(delivered.get('scrape_max_ms'), 1)} ms slowest of {SCRAPES};"
            f" RSS {_num(delivered.get('rss_mb'), 1)} MB;"
            f" start-up {_num(delivered.get('startup_s'), 2)} s"
        )
        if delivered.get("error"):
            lines.append(f"    error: {delivered['error']}")
    lines.append("")
    title = "target (information, not an assertion)"
    lines.append(f"{title:<44}{'value':>12}  {'wanted':<16}result")
    for t in report["targets"]:
        digits = 2 if t["unit"] in ("x", " s") else (1 if t["unit"] in (" MB", " ms") else 0)
        wanted = f"{t['op']} {t['threshold']:g}{t['unit']}"
        result = {True: "pass", False: "FAIL", None: "n/a"}[t["passed"]]
        value = "-" if t["value"] is None else _num(t["value"], digits) + t["unit"]
        lines.append(f"{t['name']:<44}{value:>12}  {wanted:<16}{result}")
    problems = [s for s in report["samples"] if s["error"] or s["verified"] is False]
    if problems:
        lines.append("")
        lines.append("problems:")
        for s in problems:
            lines.append(
                f"  round {s['round']} {s['case']} {s['system']}: {s['error'] or 'not verified'}"
            )
    return head + "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": os.getloadavg(),
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["uvloop"] = importlib.metadata.version("uvloop")
    here = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = (
            subprocess.run(
                ["git", "-C", str(here), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    postconf = find_tool("postconf")
    if postconf:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["postfix"] = subprocess.run(
                [postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
    return info
