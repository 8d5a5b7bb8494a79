"""Re-derive the MFU of committed trainer benchmarks after a change of the FLOP formula, without a GPU.

A row's MFU is ``F_token · tokens/s ÷ peak``; tokens/s is what was measured, so the MFU under another
formula is ``mfu_as_logged · F_new / F_old`` at the row's tokens per cell (synthetic cells fill the
context: ``s`` = tokens per cell). ``F_old = 6·N + 12·L·d·s`` counted the masked-expression head on every
token; ``F_new`` (``launch.model_size.flops_per_cell``, ``training.metrics.flops_per_token``) counts it on
the masked tokens only. Each row keeps ``mfu_as_logged``; the file gets an ``mfu_recomputed`` record
(formula, date, commit). Idempotent: a second run starts again from ``mfu_as_logged``.

    python benchmarks/recompute_mfu.py benchmarks/results/training_h100.json benchmarks/results/training_h100_1.4b.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMULA = "6·(N − N_head) + 6·N_head·r + 12·L·d·s (head on the masked fraction r of the tokens)"


def recompute(path: Path) -> list[tuple[str, float, float]]:
    from launch.model_size import flops_per_cell, model_size

    data = json.loads(path.read_text())
    changes, sizes = [], {}
    for row in data["rows"]:
        if row.get("mfu") is None:
            continue
        m = sizes.setdefault(row["size"], model_size(row["size"]))
        s = float(row["tokens_per_cell"])
        logged = row.setdefault("mfu_as_logged", row["mfu"])
        f_old = 6.0 * m.n_params_nonemb + 12.0 * m.n_layers * m.d_model * s
        f_new = flops_per_cell(m, s) / s
        row["mfu"] = logged * f_new / f_old
        changes.append((f"{row['size']} {row['context']} {row['attention']}", logged, row["mfu"]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    data["mfu_recomputed"] = {
        "formula": FORMULA, "from": "mfu_as_logged · F_new / F_old at the row's tokens_per_cell (tokens/s unchanged)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit}
    path.write_text(json.dumps(data, indent=1))
    return changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    a = ap.parse_args(argv)
    for path in a.files:
        for name, old, new in recompute(path):
            print(f"{path.name}: {name}: MFU {old:.4f} → {new:.4f} ({100 * (new / old - 1):+.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
