"""What the GPUs' clocks did during a phase of a device call: SM clock, power, temperature, and why clocks dropped.

A kernel timed in a micro-benchmark (short bursts, medians) and the same kernel inside a training run (minutes of
sustained load) can run at different SM clocks: a card at its power limit lowers them. The 160m trainer's attention
kernels ran at ~0.78× of their micro-benchmark rate (session 20's profile); this tells clocks apart from code.

``gpu_session.sh`` samples ``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits -lms 500`` into a CSV for
the whole call and, after each phase, prints one line per GPU over the phase's busy samples (utilisation ≥ 50 %)::

    python benchmarks/gpu_clocks.py CSV --since T0 --until T1 --phase NAME [--json OUT.jsonl]

``FIELDS`` (the columns, in this order; the last is left out where the driver lacks it): timestamp, index,
utilization.gpu, clocks.sm, clocks.max.sm, power.draw, power.limit, temperature.gpu, clocks_event_reasons.active.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

FIELDS = ("timestamp", "index", "utilization.gpu", "clocks.sm", "clocks.max.sm", "power.draw", "power.limit",
          "temperature.gpu", "clocks_event_reasons.active")

# NVML's clocks event reasons (nvmlClocksEventReason*), the bits of ``clocks_event_reasons.active``.
REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "power cap", 0x8: "hardware slowdown", 0x10: "sync boost",
           0x20: "thermal (software)", 0x40: "thermal (hardware)", 0x80: "power brake", 0x100: "display clock"}


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:      # "[N/A]", "[Not Supported]"
        return None


def read_samples(path: str | Path) -> list[dict]:
    """The CSV's rows as dicts (``t``: epoch seconds from the local-time stamp); malformed rows are skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < len(FIELDS) - 1:
            continue
        try:
            t = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
        except ValueError:
            continue
        frac = parts[0].rsplit(".", 1)[1] if "." in parts[0] else "0"
        row = {"t": t + (float("0." + frac) if frac.isdigit() else 0.0), "gpu": int(_num(parts[1]) or 0)}
        for name, value in zip(FIELDS[2:8], parts[2:8]):
            row[name] = _num(value)
        row["reasons"] = int(parts[8], 16) if len(parts) > 8 and parts[8].startswith("0x") else None
        rows.append(row)
    return rows


def summarize(samples: list[dict], since: float, until: float, min_util: float = 50.0) -> list[dict]:
    """Per GPU, over the busy samples in [since, until]: SM clock (median, 10th percentile, the card's maximum),
    power (median, limit), peak temperature, and the share of busy samples each event reason was active in."""
    out = []
    for gpu in sorted({s["gpu"] for s in samples}):
        busy = [s for s in samples if s["gpu"] == gpu and since <= s["t"] <= until
                and (s["utilization.gpu"] or 0) >= min_util and s["clocks.sm"] is not None]
        if not busy:
            continue
        sm = sorted(s["clocks.sm"] for s in busy)
        power = [s["power.draw"] for s in busy if s["power.draw"] is not None]
        limit = [s["power.limit"] for s in busy if s["power.limit"] is not None]
        temp = [s["temperature.gpu"] for s in busy if s["temperature.gpu"] is not None]
        flagged = [s["reasons"] for s in busy if s["reasons"] is not None]
        reasons = {name: round(sum(1 for r in flagged if r & bit) / len(flagged), 3)
                   for bit, name in REASONS.items() if any(r & bit for r in flagged)} if flagged else None
        max_sm = max((s["clocks.max.sm"] for s in busy if s["clocks.max.sm"] is not None), default=None)
        out.append({"gpu": gpu, "busy_samples": len(busy), "sm_mhz_median": statistics.median(sm),
                    "sm_mhz_p10": sm[int(0.1 * (len(sm) - 1))], "sm_mhz_max": max_sm,
                    "sm_of_max": round(statistics.median(sm) / max_sm, 3) if max_sm else None,
                    "power_w_median": statistics.median(power) if power else None,
                    "power_limit_w": max(limit) if limit else None,
                    "temperature_c_max": max(temp) if temp else None, "reasons": reasons})
    return out


def line(phase: str, row: dict) -> str:
    """One readable line for a GPU's summary."""
    reasons = ", ".join(f"{k} {v:.0%}" for k, v in (row["reasons"] or {}).items()) or "none"
    power = (f"{row['power_w_median']:.0f} of {row['power_limit_w']:.0f} W" if row["power_w_median"] is not None
             and row["power_limit_w"] is not None else "power n/a")
    of_max = f" ({row['sm_of_max']:.2f} of {row['sm_mhz_max']:.0f})" if row["sm_of_max"] else ""
    return (f"clocks {phase} gpu{row['gpu']}: SM {row['sm_mhz_median']:.0f} MHz median{of_max}, p10 "
            f"{row['sm_mhz_p10']:.0f}; {power}; max {row['temperature_c_max']} C; {row['busy_samples']} busy "
            f"samples; reasons: {reasons}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--since", type=float, required=True, help="phase start, epoch seconds")
    ap.add_argument("--until", type=float, required=True, help="phase end, epoch seconds")
    ap.add_argument("--phase", default="phase")
    ap.add_argument("--min-util", type=float, default=50.0, help="busy: GPU utilisation at least this (%%)")
    ap.add_argument("--json", help="append one JSON line per GPU to this file")
    a = ap.parse_args(argv)
    if not Path(a.csv).is_file():
        print(f"clocks {a.phase}: no samples ({a.csv} missing)")
        return 0
    rows = summarize(read_samples(a.csv), a.since, a.until, a.min_util)
    if not rows:
        print(f"clocks {a.phase}: no busy samples")
    for r in rows:
        print(line(a.phase, r))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"phase": a.phase, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
