"""Repeatability stress test of the attention kernels (GPU): the same inputs, many calls, bitwise the same answer?

Why: in one device call (session 18) the quality recipe's untrained arm, run while GPU tests hammered the same GPU,
gave a NaN validation loss and NaN mean-pooled embeddings for 12 cells in 4 contiguous runs, and no NaN in the
CLS pass over the same cells: a transient fault, not bad weights. Every kernel here is deterministic except the
backward's dQ (added by atomics or TMA reductions in any order), so any bitwise difference between two calls on
the same inputs, or any NaN/inf, is a race (e.g. shared memory read before its TMA load lands or after it is
reused) — which contention on the GPU makes likelier.

Per case (kernel × layout × head dim, batches shaped like the trainer's: packed cells of 300–2048 genes), the
first call's output is the reference; later calls are compared bitwise (forward: O; backward: dK, dV; dQ only for
being finite and within 1e-2 of the first). Before every call the outputs' memory is poisoned with NaN (freed
NaN blocks of their size), so rows a kernel never writes show as NaN. ``--load P`` runs P other processes on the
same GPU (bf16 GEMMs, device copies and our attention in a loop) for the whole run. Writes JSON (device, commit,
per case: calls, mismatching calls, non-finite calls, the first mismatch's rows); exits 1 if any case failed.

    python benchmarks/stress_attention.py --load 4 --seconds 20 --out stress.json
"""

import argparse
import datetime
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.provenance import commit  # noqa: E402

CASES = [  # (kernel, layout, D, H): 160m has D = 64 (768 / 12 heads); 1.4b D = 128
    ("op", "varlen", 64, 12), ("op", "padded", 64, 12), ("portable", "varlen", 64, 12),
    ("op", "varlen", 128, 16), ("portable", "varlen", 128, 16),
]


def _load(stop, ready):
    """Contention: GEMMs, large copies and our own attention (forward + backward: TMA, wgmma, atomics) on the same
    GPU until ``stop`` is set, as the GPU tests did beside the quality arm that gave NaN."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sigattn import api

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    q, k, v = (torch.randn(16384, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.arange(0, 16385, 2048, dtype=torch.int32, device="cuda")
    ready.set()
    while not stop.is_set():
        for _ in range(4):
            a @ b
            big.copy_(big.flip(0))
            api.sigmoid_attention_varlen(q, k, v, cu, 2048).sum().backward()
        torch.cuda.synchronize()


def _lengths(g, cells, max_len):
    return torch.randint(min(300, max_len), max_len + 1, (cells,), generator=g).tolist()


def make_case(kernel, layout, D, H, cells, max_len, seed, device="cuda"):
    from sigattn import api, triton_bwd, triton_fwd

    g = torch.Generator().manual_seed(seed)
    lens = _lengths(g, cells, max_len)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    mk = lambda: torch.randn(T, H, D, generator=g).to(device, torch.bfloat16)  # noqa: E731
    q, k, v, do = mk(), mk(), mk(), mk()
    scale = D ** -0.5
    if layout == "padded":
        B, N = len(lens), max(lens)

        def pad(t):
            out = t.new_zeros(B, N, H, D)
            for i, L in enumerate(lens):
                out[i, :L] = t[cu[i]:cu[i + 1]]
            return out
        q, k, v, do = pad(q), pad(k), pad(v), pad(do)
        seq = torch.tensor(lens, dtype=torch.int32, device=device)
    kw = dict(scale=scale, bias=0.0, log_n_bias=True, causal=False)
    if kernel == "portable":          # the Triton kernels every GPU runs (on sm90 the ops' backward is this one)
        info, vl, ms = (cu, True, max(lens)) if layout == "varlen" else (seq, False, max(lens))
        return (lambda: (triton_fwd.launch_fwd(q, k, v, info, varlen=vl, max_seqlen=ms, **kw),
                         *triton_bwd.launch_bwd(do, q, k, v, info, varlen=vl, max_seqlen=ms, **kw))), q.shape
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def op():                         # the public API as the trainer calls it (forward: Hopper kernel on sm90)
        for t in (qg, kg, vg):
            t.grad = None
        if layout == "varlen":
            o = api.sigmoid_attention_varlen(qg, kg, vg, cu, max(lens), scale=scale)
        else:
            o = api.sigmoid_attention(qg, kg, vg, seq_lens=seq, scale=scale)
        o.backward(do)
        return o.detach(), qg.grad, kg.grad, vg.grad
    return op, q.shape


def _rows(a, b):
    diff = (a != b) | ~torch.isfinite(a)
    while diff.dim() > 1:
        diff = diff.any(-1)
    return torch.nonzero(diff).flatten()[:8].tolist()


def poisoner(shape, device, copies=4):
    """Before a call: NaN-filled blocks of the outputs' size, freed, so the caching allocator hands them to the
    kernels' ``torch.empty`` outputs: rows a kernel never writes then read NaN instead of an earlier call's
    (identical) answer."""
    def poison():
        blocks = [torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device) for _ in range(copies)]
        del blocks
    return poison


def run_case(fn, seconds, poison=None):
    poison = poison or (lambda: None)
    poison()
    ref = [t.clone() for t in fn()]
    stats = {"calls": 1, "mismatch_calls": 0, "nonfinite_calls": 0, "dq_far_calls": 0, "first": None,
             "ref_nonfinite": int(sum((~torch.isfinite(t)).sum().item() for t in ref))}
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        poison()
        out = fn()
        stats["calls"] += 1
        o, dq, dk, dv = out
        bad = {n: _rows(x, r) for n, x, r in (("out", o, ref[0]), ("dk", dk, ref[2]), ("dv", dv, ref[3]))}
        bad = {n: rows for n, rows in bad.items() if rows}
        nonfinite = not all(bool(torch.isfinite(x).all()) for x in out)
        far = float(((dq.float() - ref[1].float()).norm() / ref[1].float().norm().clamp_min(1e-30))) > 1e-2
        stats["mismatch_calls"] += bool(bad)
        stats["nonfinite_calls"] += nonfinite
        stats["dq_far_calls"] += far
        if (bad or nonfinite or far) and stats["first"] is None:
            stats["first"] = {"call": stats["calls"], "rows": bad, "nonfinite": nonfinite, "dq_far": far}
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="per case")
    ap.add_argument("--cells", type=int, default=64, help="cells per batch (the embed/eval batch)")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--load", type=int, default=0, metavar="P",
                    help="P other processes keep the GPU busy meanwhile (the NaN arm ran beside 8 pytest workers, "
                         "each its own CUDA context: the GPU time-slices between contexts)")
    ap.add_argument("--cases", nargs="+", help="kernel:layout:D:H (default: the built-in list)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (TRITON_INTERPRET=1, tiny shapes)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/stress_attention.py needs a CUDA GPU (or --device cpu for a dry run)")
    if a.load and a.device != "cuda":
        raise SystemExit("--load needs a CUDA GPU")
    cases = ([(c.split(":")[0], c.split(":")[1], int(c.split(":")[2]), int(c.split(":")[3])) for c in a.cases]
             if a.cases else CASES)
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else a.device, "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "load": a.load,
              "seconds_per_case": a.seconds, "cells": a.cells, "max_len": a.max_len, "cases": []}
    procs = []
    if a.load:
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        for _ in range(a.load):
            ready = ctx.Event()
            procs.append(ctx.Process(target=_load, args=(stop, ready), daemon=True))
            procs[-1].start()
            ready.wait(180)
    failed = False
    try:
        for i, (kernel, layout, D, H) in enumerate(cases):
            fn, shape = make_case(kernel, layout, D, H, a.cells, a.max_len, seed=i, device=a.device)
            s = run_case(fn, a.seconds, poisoner(shape, a.device))
            s.update(kernel=kernel, layout=layout, D=D, H=H)
            result["cases"].append(s)
            bad = s["mismatch_calls"] or s["nonfinite_calls"] or s["dq_far_calls"] or s["ref_nonfinite"]
            failed |= bool(bad)
            print(f"{kernel:>9} {layout:>7} D={D:<4} calls {s['calls']:>6}  mismatching {s['mismatch_calls']:>5}  "
                  f"non-finite {s['nonfinite_calls']:>5}  dQ far {s['dq_far_calls']:>4}  "
                  f"{'FAIL ' + json.dumps(s['first']) if bad else 'ok'}", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1))
    finally:
        if procs:
            stop.set()
            for p in procs:
                p.join(30)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
