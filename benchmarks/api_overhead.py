"""Public API vs the op it wraps: what the Python layer of ``sigattn.sigmoid_attention_varlen`` costs per call.

A packed batch of ``--cells`` cells of ``N`` tokens each (hd ``--d``, hidden 2048, bf16 on CUDA), forward and
forward+backward, timed as the median of ``--repeats`` runs of ``--inner`` back-to-back calls (CUDA events around
the loop: host overhead that stalls the GPU shows up, overhead hidden behind running kernels does not — which is
what a training step sees). Rows: ``api`` (the public call) and ``op`` (``torch.ops.sigattn.attn_varlen_fwd``
directly, the same autograd); their repeats alternate (api, op, api, op, ...) so GPU clock ramps and thermal drift
fall on both alike. Target (issue 14): api ≤ 1.03 × op at N = 1024, 16 cells.

Host cost per layer (``--host-layers``, CUDA only): at a tiny shape (GPU time per call ≪ host time) the wall time of
``--inner`` calls without a sync is what each layer costs the CPU: ``api`` → ``op`` (dispatcher, autograd) →
``launcher`` (triton_ops, kernel choice) → ``kernel`` (the chosen kernel's launch_fwd: descriptors, Triton's
launch path) and ``empty`` (one ``torch.empty``, the floor). ``--profile FILE`` writes a cProfile of the op calls.

    python benchmarks/api_overhead.py --out benchmarks/results/api_overhead_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigattn  # noqa: E402
from benchmarks.provenance import commit  # noqa: E402


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
        fns = {}
        for name, call in calls.items():
            if mode == "fwd":
                def fn(call=call):
                    with torch.no_grad():
                        call()
            else:
                def fn(call=call):
                    call().backward(grad)
            fn()                                                  # compile / autotune outside the timing
            fns[name] = fn
        times = {name: [] for name in fns}
        for _ in range(repeats):                                  # interleaved: api, op, api, op, ...
            for name, fn in fns.items():
                times[name].append(timer(fn, inner))
        for name in fns:
            rows.append({"N": N, "cells": cells, "D": D, "mode": mode, "call": name,
                         "us_median": statistics.median(times[name]), "us_all": times[name]})
    for mode in ("fwd", "fwd_bwd"):
        api, op = (next(r for r in rows if r["mode"] == mode and r["call"] == c) for c in ("api", "op"))
        api["ratio_to_op"] = api["us_median"] / op["us_median"]
    return rows


def host_layers(D: int, repeats: int, inner: int, N: int = 64, cells: int = 2, profile: Path | None = None) -> list:
    """Host µs per call of each layer at a shape whose kernels take a few µs (so the CPU, not the GPU, sets the pace)."""
    from sigattn import triton_ops
    H = 2048 // D
    T = N * cells
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.arange(0, T + 1, N, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    kw = dict(varlen=True, max_seqlen=N, scale=scale, bias=0.0, log_n_bias=True, causal=False)
    layers = {
        "api": lambda: sigattn.sigmoid_attention_varlen(q, k, v, cu, N),
        "op": lambda: torch.ops.sigattn.attn_varlen_fwd(q, k, v, cu, N, scale, 0.0, True, False),
        "launcher": lambda: triton_ops.attn_varlen_fwd(q, k, v, cu, N, scale, 0.0, True, False),
        "kernel": lambda: triton_ops.launch_fwd(q, k, v, cu, **kw),
        "empty": lambda: torch.empty_like(q),
    }
    rows = []
    with torch.no_grad():
        for fn in layers.values():
            fn()
        torch.cuda.synchronize()
        times = {name: [] for name in layers}
        for _ in range(repeats):
            for name, fn in layers.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) / inner * 1e6)
                torch.cuda.synchronize()
        for name in layers:
            rows.append({"N": N, "cells": cells, "D": D, "mode": "host", "call": name,
                         "us_median": statistics.median(times[name]), "us_all": times[name]})
        if profile is not None:
            import cProfile
            import io
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                layers["op"]()
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.write_text(f"cProfile of 200 calls of torch.ops.sigattn.attn_varlen_fwd, N={N}, D={D}\n"
                               + buf.getvalue())
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--host-layers", action="store_true", help="also measure host µs per call of each layer (CUDA)")
    ap.add_argument("--profile", type=Path, help="with --host-layers: write a cProfile of the op calls here")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "setup": vars(args) | {"out": str(args.out), "profile": str(args.profile), "device": str(device)},
              "rows": []}
    for N in args.n:
        result["rows"] += measure(N, args.cells, args.d, device, args.repeats, args.inner)
    if args.host_layers and device.type == "cuda":
        result["rows"] += host_layers(args.d, args.repeats, 5 * args.inner, profile=args.profile)
    for r in result["rows"]:
        ratio = f"  api/op {r['ratio_to_op']:.3f}" if "ratio_to_op" in r else ""
        print(f"N={r['N']:5d} {r['mode']:8s} {r['call']:4s} {r['us_median']:9.1f} µs{ratio}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
