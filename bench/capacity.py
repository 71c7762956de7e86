"""How many worker slots one Postgres (and one PgBouncer) serves: a calculation from the costs
``bench/coordination.py`` measured, not a run of 1,000 workers.

    python bench/coordination.py --workers 1 --prefill 100 --loops seqtune --epochs 20 \
        --trials-per-worker 40 --json bench/results/coordination-cost-20.json [--pgbouncer]
    python bench/coordination.py --workers 1 --prefill 100 --loops seqtune --epochs 0 \
        --trials-per-worker 40 --json bench/results/coordination-cost-0.json [--pgbouncer]
    python bench/capacity.py bench/results/coordination-cost-{20,0}.json [PGBOUNCER 20 0]

From one worker alone (no contention), the server CPU each trial cost with 20 epoch reports and
with none gives the cost of one report and of the rest (claim with its share of the buffer's
asks, tell). A fleet of N slots, each running trials of E epochs of T seconds, then asks
Postgres for

    N / (E * T) * (trial_rest + E * report)      CPU seconds per second (cores),

plus heartbeats (one UPDATE per slot every ``heartbeat_s``, costed as a report), and the same
for PgBouncer, which runs on one core. The ask lock serialises one study's asks: its claim rate
N / (E * T) times one ask must stay under 1 (the per-suggestion time is measured too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEARTBEAT_S = 5.0  # Settings.heartbeat_s's default
EPOCHS = (10, 50)
EPOCH_S = (0.5, 2.0, 10.0)
SLOTS = 1000


def costs(with_reports: Path, without: Path) -> dict[str, Any]:
    a, b = (json.loads(p.read_text()) for p in (with_reports, without))
    (ra,), (rb,) = a["rows"], b["rows"]
    reports = ra.get("epochs", 20)
    per_report = (ra["postgres_cpu_ms_per_trial"] - rb["postgres_cpu_ms_per_trial"]) / reports
    bouncer_report = (ra["pgbouncer_cpu_ms_per_trial"] - rb["pgbouncer_cpu_ms_per_trial"]) / reports
    return {
        "via": a["via"],
        "report_ms": per_report,
        "rest_ms": rb["postgres_cpu_ms_per_trial"],
        "bouncer_report_ms": bouncer_report,
        "bouncer_rest_ms": rb["pgbouncer_cpu_ms_per_trial"],
        "claim_p50_ms": rb["claim_p50"],
        "connections_per_slot": max(ra["peak_connections"], rb["peak_connections"]),
    }


def load(n: int, e: int, t: float, rest: float, report: float) -> float:
    """Cores busy for n slots running trials of e epochs of t seconds."""
    trials_per_s = n / (e * t)
    return (trials_per_s * (rest + e * report) + n / HEARTBEAT_S * report) / 1000


def main() -> None:
    args = [Path(a) for a in sys.argv[1:]]
    direct = costs(args[0], args[1])
    bouncer = costs(args[2], args[3]) if len(args) >= 4 else None
    for c in filter(None, (direct, bouncer)):
        print(
            f"{c['via']}: Postgres CPU {c['report_ms']:.2f} ms per report, "
            f"{c['rest_ms']:.2f} ms per trial besides (claim, asks, tell); PgBouncer "
            f"{c['bouncer_report_ms']:.2f} / {c['bouncer_rest_ms']:.2f} ms; "
            f"peak {c['connections_per_slot']} Postgres connections for one slot"
        )
    print(f"\n{SLOTS:,} slots (heartbeat every {HEARTBEAT_S:.0f} s):\n")
    head = "| epochs per trial | seconds per epoch | claims per s | Postgres cores (direct) |"
    line = "|---:|---:|---:|---:|"
    if bouncer:
        head += " Postgres cores (PgBouncer) | PgBouncer core |"
        line += "---:|---:|"
    print(head)
    print(line)
    for e in EPOCHS:
        for t in EPOCH_S:
            row = (
                f"| {e} | {t:g} | {SLOTS / (e * t):.1f} | "
                f"{load(SLOTS, e, t, direct['rest_ms'], direct['report_ms']):.2f} |"
            )
            if bouncer:
                row += (
                    f" {load(SLOTS, e, t, bouncer['rest_ms'], bouncer['report_ms']):.2f} | "
                    f"{load(SLOTS, e, t, bouncer['bouncer_rest_ms'], bouncer['bouncer_report_ms']):.2f} |"  # noqa: E501
                )
            print(row)


if __name__ == "__main__":
    main()
