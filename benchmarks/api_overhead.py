"""Public API vs the op it wraps: what the Python layer of ``sigattn.sigmoid_attention_varlen`` costs per call.

A packed batch of ``--cells`` cells of ``N`` tokens each (hd ``--d``, hidden 2048, bf16 on CUDA), forward and
forward+backward, timed as the median of ``--repeats`` runs of ``--inner`` back-to-back calls (CUDA events around
the loop: host overhead that stalls the GPU shows up, overhead hidden behind running kernels does not — which is
what a training step sees). Rows: ``api`` (the public call) and ``op`` (``torch.ops.sigattn.attn_varlen_fwd``
directly, the same autograd). Target (issue 14): api ≤ 1.03 × op at N = 1024, 16 cells.

    python benchmarks/api_overhead.py --out benchmarks/results/api_overhead_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigattn  # noqa: E402


def commit() -> str | None:
    """The commit measured (``SIGATTN_COMMIT`` where the checkout travels without ``.git``)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except OSError:
        out = None
    return os.environ.get("SIGATTN_COMMIT", out)


def _timer(device):
    if device.type == "cuda":
        def run(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner * 1e3          # µs per call
    else:
        def run(fn, inner):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) / inner * 1e6
    return run


def measure(N: int, cells: int, D: int, device: torch.device, repeats: int, inner: int, hidden: int = 2048) -> list:
    H = hidden // D
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T = N * cells
    q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.arange(0, T + 1, N, dtype=torch.int32, device=device)
    scale = D ** -0.5
    calls = {
        "api": lambda: sigattn.sigmoid_attention_varlen(q, k, v, cu, N),
        "op": lambda: torch.ops.sigattn.attn_varlen_fwd(q, k, v, cu, N, scale, 0.0, True, False),
    }
    grad = torch.randn(T, H, D, device=device, dtype=dtype)
    timer = _timer(device)
    rows = []
    for mode in ("fwd", "fwd_bwd"):
        for name, call in calls.items():
            if mode == "fwd":
                def fn(call=call):
                    with torch.no_grad():
                        call()
            else:
                def fn(call=call):
                    call().backward(grad)
            fn()                                                  # compile / autotune outside the timing
            times = [timer(fn, inner) for _ in range(repeats)]
            rows.append({"N": N, "cells": cells, "D": D, "mode": mode, "call": name,
                         "us_median": statistics.median(times), "us_all": times})
    for mode in ("fwd", "fwd_bwd"):
        api, op = (next(r for r in rows if r["mode"] == mode and r["call"] == c) for c in ("api", "op"))
        api["ratio_to_op"] = api["us_median"] / op["us_median"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "setup": vars(args) | {"out": str(args.out), "device": str(device)}, "rows": []}
    for N in args.n:
        result["rows"] += measure(N, args.cells, args.d, device, args.repeats, args.inner)
    for r in result["rows"]:
        ratio = f"  api/op {r['ratio_to_op']:.3f}" if "ratio_to_op" in r else ""
        print(f"N={r['N']:5d} {r['mode']:8s} {r['call']:4s} {r['us_median']:9.1f} µs{ratio}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
