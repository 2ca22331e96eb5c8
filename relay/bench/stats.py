"""`relay bench`'s statistics: the cases and systems it measures, one sample per case,
system and round, medians and ratios to the baseline, and the targets they are held to.
Pure: no servers, no clock.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from relay.bench.loadgen import LoadResult, percentile

RELAY, PER_MESSAGE, BARE, POSTFIX = "relay", "relay_per_message", "bare", "postfix"
RELAY_WORKERS = "relay_workers"  # `relay serve --workers N` (N from `relay bench --workers`)
LABELS = {RELAY: "relay", PER_MESSAGE: "per-msg commit", BARE: "bare aiosmtpd", POSTFIX: "postfix",
          RELAY_WORKERS: "relay workers"}
SCRAPES = 20  # GET /metrics this many times over a queue of delivered records
# case -> (description, systems measured in it); the order is rotated each round.
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ingest_conn": ("durable ingest, 1 connection/message, msgs/s",
                    (RELAY, RELAY_WORKERS, BARE, POSTFIX)),
    "ingest_sess": ("durable ingest, persistent sessions, msgs/s",
                    (RELAY, RELAY_WORKERS, BARE, POSTFIX)),
    "ack": ("ack latency, persistent sessions, delivering",
            (RELAY, RELAY_WORKERS, PER_MESSAGE, BARE)),
    "e2e": ("end-to-end, msgs/s", (RELAY, RELAY_WORKERS, POSTFIX)),
}


@dataclass
class Sample:
    round: int
    case: str
    system: str
    messages: int
    tool: str = ""
    rate: float | None = None  # msgs/s; end-to-end: first sent to last received
    ingest_rate: float | None = None  # end-to-end cases: the sender's own rate
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    startup_s: float | None = None
    rss_mb: float | None = None
    cpu_s: float | None = None
    verified: bool | None = None
    error: str | None = None

    def take(self, result: LoadResult) -> None:
        self.tool = result.tool
        self.rate = result.rate if result.accepted else None
        if result.latencies_s:
            for q in (50, 90, 99):
                value = percentile(result.latencies_s, q)
                setattr(self, f"p{q}_ms", None if value is None else value * 1000)
        if result.failed or result.errors:
            self.error = f"{result.failed} failed: {'; '.join(result.errors)}"


def fmt_dict(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


# -- figures, ratios, targets -------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _value(samples: list[Sample], case: str, system: str, attr: str, round_: int) -> float | None:
    for s in samples:
        if s.case == case and s.system == system and s.round == round_:
            value = getattr(s, attr)
            return float(value) if value is not None else None
    return None


def summarize(samples: list[Sample], rounds: int) -> dict[str, Any]:
    """Medians per case and system, and medians of same-round ratios relay/baseline."""
    figures: dict[str, Any] = {}
    for case, (_, systems) in CASES.items():
        attrs = ["p50_ms", "p90_ms", "p99_ms"] if case == "ack" else ["rate"]
        if case == "e2e":
            attrs.append("ingest_rate")
        entry: dict[str, Any] = {}
        for system in systems:
            entry[system] = {
                a: _median(
                    [
                        v
                        for r in range(1, rounds + 1)
                        if (v := _value(samples, case, system, a, r)) is not None
                    ]
                )
                for a in attrs
            }
        attr = "p99_ms" if case == "ack" else "rate"
        for base in systems[1:]:
            ratios = []
            for r in range(1, rounds + 1):
                mine, theirs = (
                    _value(samples, case, RELAY, attr, r),
                    _value(samples, case, base, attr, r),
                )
                if mine is not None and theirs:
                    ratios.append(mine / theirs)
            entry[f"ratio_{base}"] = _median(ratios)
        figures[case] = entry
    relay_runs = [s for s in samples if s.system == RELAY and s.startup_s is not None]
    figures["relay_startup_s"] = _median([s.startup_s for s in relay_runs if s.startup_s])
    figures["rss_after_e2e_mb"] = _median(
        [s.rss_mb for s in samples if s.case == "e2e" and s.system == RELAY and s.rss_mb]
    )
    figures["relay_cpu_ms_per_msg"] = {
        case: _median(
            [
                1000 * s.cpu_s / s.messages
                for s in samples
                if s.case == case and s.system == RELAY and s.cpu_s
            ]
        )
        for case in CASES
    }
    return figures


@dataclass
class Target:
    name: str
    value: float | None
    op: str
    threshold: float
    unit: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        if self.op == ">=":
            return self.value >= self.threshold
        if self.op == "<=":
            return self.value <= self.threshold
        return self.value < self.threshold


def targets(
    figures: dict[str, Any], queued: dict[str, Any] | None,
    delivered: dict[str, Any] | None = None,
) -> list[Target]:
    ic, isess, ack, e2e = (figures[c] for c in ("ingest_conn", "ingest_sess", "ack", "e2e"))
    n = queued["messages"] if queued else 0
    rss = [queued.get(k) for k in ("rss_after_fill_mb", "rss_after_restart_mb")] if queued else []
    rss_values = [v for v in rss if v is not None]
    return [
        Target("ingest 1 conn/msg vs postfix", ic.get("ratio_postfix"), ">=", 1.0, "x"),
        Target("ingest 1 conn/msg vs bare aiosmtpd", ic.get("ratio_bare"), ">=", 0.8, "x"),
        Target("ingest persistent vs postfix", isess.get("ratio_postfix"), ">=", 1.0, "x"),
        Target("ingest persistent vs bare aiosmtpd", isess.get("ratio_bare"), ">=", 0.8, "x"),
        Target("ingest persistent", isess[RELAY]["rate"], ">=", 1000, " msgs/s"),
        Target("end-to-end vs postfix", e2e.get("ratio_postfix"), ">=", 1.0, "x"),
        Target("ack p99", ack[RELAY]["p99_ms"], "<=", 25, " ms"),
        Target("ack p99 vs per-message commit", ack.get(f"ratio_{PER_MESSAGE}"), "<=", 0.6, "x"),
        Target(f"RSS with {n:,} queued", max(rss_values) if rss_values else None, "<=", 64, " MB"),
        Target(
            f"start-up with {n:,} queued", queued.get("startup_s") if queued else None, "<", 5, " s"
        ),
        *delivered_targets(delivered),
    ]


def delivered_targets(delivered: dict[str, Any] | None) -> list[Target]:
    """Issue 11.17: /metrics and RSS must not grow with the delivered records kept."""
    if not delivered:
        return []
    n = delivered["messages"]
    return [
        Target(f"/metrics, {n:,} delivered (slowest)", delivered.get("scrape_max_ms"), "<",
               50, " ms"),
        Target(f"RSS with {n:,} delivered", delivered.get("rss_mb"), "<=", 64, " MB"),
    ]
