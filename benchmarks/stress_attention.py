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

Case ``encoder:PRESET`` (e.g. ``encoder:160m``) runs the whole model the way the quality recipe's evaluation does
(random initial weights, bf16 autocast, no grad): mean-pooled and CLS embeddings and the masked loss, all compared
bitwise — the path that gave the NaN, not the attention alone. ``--fill-uninitialized`` turns on
``torch.use_deterministic_algorithms`` with ``torch.utils.deterministic.fill_uninitialized_memory``: every
``torch.empty`` (ours and every ATen kernel's) is then filled with NaN, so an unwritten row shows on every call, not
only when leftover memory holds a NaN (the backward then takes its deterministic dQ path).

    python benchmarks/stress_attention.py --load 4 --seconds 20 --out stress.json
    python benchmarks/stress_attention.py --cases encoder:160m op:varlen:64:12 --fill-uninitialized --out s.json
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
    ("op", "varlen", 128, 16), ("portable", "varlen", 128, 16), ("encoder", "160m", 64, 12),
]


def parse_case(text: str) -> tuple:
    """``kernel:layout:D:H`` or ``encoder:PRESET`` → (kernel, layout or preset, D, H); a clear error otherwise."""
    from training.presets import PRESETS

    parts = text.split(":")
    if parts[0] == "encoder" and len(parts) == 2 and parts[1] in PRESETS:
        p = PRESETS[parts[1]]
        return "encoder", parts[1], p["d_model"] // p["n_heads"], p["n_heads"]
    if (len(parts) == 4 and parts[0] in ("op", "portable") and parts[1] in ("varlen", "padded")
            and parts[2].isdigit() and parts[3].isdigit()):
        return parts[0], parts[1], int(parts[2]), int(parts[3])
    raise SystemExit(f"--cases: {text!r} is neither kernel:layout:D:H (kernel op|portable, layout varlen|padded) "
                     f"nor encoder:PRESET (PRESET one of {sorted(PRESETS)})")


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


def make_encoder_case(preset_name, cells, max_len, seed, device="cuda", n_tokens=20_000, n_bins=51):
    """The encoder at random initial weights on one fixed packed batch → ``fn() -> {mean, cls, loss}``, as
    ``training.embed`` / ``training.evaluate`` call it (bf16 autocast on a GPU, no grad)."""
    import contextlib

    from training.config import ModelConfig
    from training.encoder import build_model
    from training.presets import preset

    torch.manual_seed(seed)
    cfg = ModelConfig(preset=preset_name, **preset(preset_name), n_tokens=n_tokens, n_bins=n_bins)
    model = build_model(cfg, device).eval()
    g = torch.Generator().manual_seed(seed)
    lens = _lengths(g, cells, max_len)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    values = torch.randint(1, n_bins + 1, (T,), generator=g)
    values[cu[:-1].long()] = n_bins + 1                                    # CLS value id
    batch = {"input_ids": torch.randint(0, n_tokens, (T,), generator=g).to(device), "values": values.to(device),
             "cu_seqlens": cu.to(device), "max_seqlen": max(lens)}
    masked = torch.nonzero((torch.rand(T, generator=g) < 0.15) & (values <= n_bins)).flatten().to(device)  # genes
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda")
                else contextlib.nullcontext())

    def fn():
        with torch.no_grad(), autocast:
            loss, _ = model(batch, masked)
            return {"mean": model.embed(batch, "mean"), "cls": model.embed(batch, "cls"), "loss": loss.reshape(1)}
    return fn, (T, cfg.d_ff)


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
        def portable():
            o = triton_fwd.launch_fwd(q, k, v, info, varlen=vl, max_seqlen=ms, **kw)
            return dict(zip(("out", "dq", "dk", "dv"), (o, *triton_bwd.launch_bwd(do, q, k, v, info, varlen=vl,
                                                                                   max_seqlen=ms, **kw))))
        return portable, q.shape
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def op():                         # the public API as the trainer calls it (forward: Hopper kernel on sm90)
        for t in (qg, kg, vg):
            t.grad = None
        if layout == "varlen":
            o = api.sigmoid_attention_varlen(qg, kg, vg, cu, max(lens), scale=scale)
        else:
            o = api.sigmoid_attention(qg, kg, vg, seq_lens=seq, scale=scale)
        o.backward(do)
        return {"out": o.detach(), "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
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


def run_case(fn, seconds, poison=None, loose=("dq",)):
    """Call ``fn() -> {name: tensor}`` again and again for ``seconds``; the first call is the reference. Names in
    ``loose`` (dQ: added in any order) must stay finite and within 1e-2 (relative norm), the others bitwise."""
    poison = poison or (lambda: None)
    poison()
    ref = {n: t.clone() for n, t in fn().items()}
    stats = {"calls": 1, "mismatch_calls": 0, "nonfinite_calls": 0, "dq_far_calls": 0, "first": None,
             "ref_nonfinite": int(sum((~torch.isfinite(t)).sum().item() for t in ref.values()))}
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        poison()
        out = fn()
        stats["calls"] += 1
        bad = {n: _rows(x, ref[n]) for n, x in out.items() if n not in loose}
        bad = {n: rows for n, rows in bad.items() if rows}
        nonfinite = not all(bool(torch.isfinite(x).all()) for x in out.values())
        far = any(float((out[n].float() - ref[n].float()).norm() / ref[n].float().norm().clamp_min(1e-30)) > 1e-2
                  for n in loose if n in out)
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
    ap.add_argument("--cases", nargs="+", help="kernel:layout:D:H or encoder:PRESET (default: the built-in list)")
    ap.add_argument("--fill-uninitialized", action="store_true",
                    help="every torch.empty filled with NaN (torch's deterministic mode; deterministic dQ path)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (TRITON_INTERPRET=1, tiny shapes)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/stress_attention.py needs a CUDA GPU (or --device cpu for a dry run)")
    if a.load and a.device != "cuda":
        raise SystemExit("--load needs a CUDA GPU")
    cases = [parse_case(c) for c in a.cases] if a.cases else CASES
    if a.fill_uninitialized:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else a.device, "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "load": a.load,
              "seconds_per_case": a.seconds, "cells": a.cells, "max_len": a.max_len,
              "fill_uninitialized": a.fill_uninitialized, "cases": []}
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
            if kernel == "encoder":
                fn, shape = make_encoder_case(layout, a.cells, a.max_len, seed=i, device=a.device)
            else:
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
