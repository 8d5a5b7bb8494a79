"""Attention kernel benchmark (GPU): our sigmoid kernels vs triton-sigmoid, SDPA flash/cuDNN, FlexAttention.

Ours: ``hopper_padded``/``hopper_varlen`` = the Gluon sm90 forward (sigattn/hopper_fwd.py; backward is the portable
Triton one, as the ops run it), ``hopper_bwd_padded``/``hopper_bwd_varlen`` = the same with the Gluon sm90 backward
(sigattn/hopper_bwd.py, opt-in: dQ in its own kernel), ``hopper_bwd5_padded``/``hopper_bwd5_varlen`` = its 5-GEMM
variant (dQ by fp32 vector reductions from the K/V kernel), ``hopper_bwd5t_padded``/``hopper_bwd5t_varlen`` = the
same with dQ by TMA reductions from shared memory (``hopper_bwd.DQ_TMA``; ``hopper_bwd5t1_padded``: its serial
form 1; ``hopper_bwd5t_m128_padded``/``…_varlen``, ``hopper_bwd_m128_…`` for the 7-GEMM one: 128-row query tiles
in the kv kernel, ``launch_bwd(kv_blocks=(128, 128))``, D = 64 candidates), ``hopper_bwd_probe``/``hopper_bwd5_probe``
= those backwards (padded) with σ and dS skipped (timing probes, wrong gradients: what the GEMMs and data movement
alone take),
``hopper_bwd5_probe2`` = the 5-GEMM one without its dQ reductions, ``hopper_bwd_oX_padded``/``hopper_bwd_o0_probe`` =
the 7-GEMM one at overlap level X (``hopper_bwd.OVERLAP``; the unsuffixed names use the default),
``hopper_bwd_sig2_padded``/``hopper_bwd5_sig2_padded`` = σ by ex2 + rcp.approx (``hopper_bwd.SIG_BWD``),
``ours_padded``/``ours_varlen`` = the portable Triton kernels as the ops run them (dQ by TMA reductions for varlen
on sm90, atomics for padded: ``triton_tuning.dq_tma``), ``ours_dqtma_*``/``ours_dqatomic_*`` = their backward with
dQ by TMA reductions / by atomics forced (``launch_bwd(dq_tma=True|False)``; backward rows only).

Setup (issue 3): bf16, 16,384 tokens per step, hidden 2048 (H = 2048/D), non-causal, −log n bias on for sigmoid
kernels. Padding p ∈ {0, 25, 50}%: B = 16384/N sequences with lengths evenly spread over [(1−2p)·N, N] (mean
(1−p)·N; a single sequence gets (1−p)·N). FLOPs on real tokens: forward 4·H·D·ΣL², backward-only 2.5× that.
Times are medians of ``triton.testing.do_bench`` (warm-up + repeats, CUDA events). SDPA flash/cuDNN have no
key-padding path, so they run at p = 0 only. Writes JSON (device, versions, date, every row) and prints ratios.

    python benchmarks/attention.py --d 128 --out benchmarks/results/attention_d128.json
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import commit  # noqa: E402
from sigattn.triton_bwd import launch_bwd  # noqa: E402
from sigattn.triton_fwd import launch_fwd  # noqa: E402

TOKENS, HIDDEN = 16384, 2048
KERNELS = ["hopper_padded", "hopper_varlen", "hopper_bwd_padded", "hopper_bwd_varlen", "hopper_bwd5_padded",
           "hopper_bwd5_varlen", "hopper_bwd5t_padded", "hopper_bwd5t_varlen", "hopper_bwd5t1_padded",
           "hopper_bwd5t_m128_padded", "hopper_bwd5t_m128_varlen", "hopper_bwd_m128_padded", "hopper_bwd_m128_varlen",
           "hopper_bwd_probe", "hopper_bwd5_probe", "hopper_bwd_o0_padded", "hopper_bwd_o1_padded",
           "hopper_bwd_o2_padded", "hopper_bwd_o0_probe", "hopper_bwd5_probe2", "hopper_bwd_sig2_padded",
           "hopper_bwd5_sig2_padded", "ours_padded", "ours_varlen", "ours_dqtma_padded", "ours_dqtma_varlen",
           "ours_dqatomic_padded", "ours_dqatomic_varlen", "sdpa_flash", "sdpa_cudnn", "ours_padded_det", "tsig",
           "flex"]


def lengths(N: int, pad: float) -> list[int]:
    B = TOKENS // N
    lo = (1 - 2 * pad) * N if pad <= 0.5 else 0
    return [max(1, min(N, round(lo + (N - lo) * (i + 0.5) / B))) for i in range(B)] if pad else [N] * B


def flops_fwd(H, D, lens):
    return 4 * H * D * sum(L * L for L in lens)


def _tensors(B, N, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def make_runner(kernel, D, N, pad):
    """Return (fwd_fn, bwd_fn) closures for one configuration, or None when the kernel does not apply."""
    H = HIDDEN // D
    lens = lengths(N, pad)
    B = len(lens)
    q, k, v, do = _tensors(B, N, H, D)
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    kw = dict(scale=scale, bias=0.0, log_n_bias=True, causal=False)
    if kernel == "ours_padded_det" and (pad or N not in (1024, 4096, 16384)):
        return None
    if "_m128" in kernel and D != 64:  # 128-row query tiles fit the shared memory at D = 64 only
        return None
    tma = True if "_dqtma" in kernel else False if "_dqatomic" in kernel else None  # None: the ops' default
    if kernel in ("ours_padded", "ours_padded_det", "ours_dqtma_padded", "ours_dqatomic_padded"):
        det = kernel.endswith("det")
        return (lambda: launch_fwd(q, k, v, seq, varlen=False, max_seqlen=N, **kw),
                lambda: launch_bwd(do, q, k, v, seq, varlen=False, max_seqlen=N, deterministic=det, dq_tma=tma,
                                   **kw))
    if kernel.startswith("hopper"):
        # hopper_*: the Gluon forward + the portable backward (what the ops run); hopper_bwd_*: the Gluon forward +
        # the Gluon backward (sigattn/hopper_bwd.py, opt-in); hopper_bwd5_*: its dQ-by-atomics variant (5t: by TMA)
        from sigattn import hopper_bwd, hopper_fwd

        cfg = os.environ.get("SIGATTN_HOPPER_CONFIG")  # "BLOCK_M,BLOCK_N,STAGES" to try another tiling
        hkw = dict(kw, config=tuple(int(x) for x in cfg.split(",")) if cfg else None)
        if kernel.startswith("hopper_bwd"):
            # hopper_bwd_oX_*: the 7-GEMM variant at overlap level X (hopper_bwd.OVERLAP)
            atomic = ("tma1" if kernel.startswith("hopper_bwd5t1") else "tma" if kernel.startswith("hopper_bwd5t")
                      else kernel.startswith("hopper_bwd5"))
            probe = 2 if kernel.endswith("probe2") else int(kernel.endswith("probe"))
            overlap = int(kernel[len("hopper_bwd_o")]) if kernel.startswith("hopper_bwd_o") else None
            sig = 2 if "_sig2" in kernel else None
            kv_blocks = (128, 128) if "_m128" in kernel else None  # hopper_bwd*_m128_*: 128-row query tiles
            bwd_fn = lambda *a, **k: hopper_bwd.launch_bwd(*a, dq_atomic=atomic, probe=probe,  # noqa: E731
                                                          overlap=overlap, sig=sig, kv_blocks=kv_blocks, **k)
        else:
            bwd_fn = lambda *a, **k: launch_bwd(*a, deterministic=False, **k)  # noqa: E731

        if kernel.endswith("varlen"):
            pack = lambda t: torch.cat([t[i, :L] for i, L in enumerate(lens)])  # noqa: E731
            qp, kp, vp, dop = pack(q), pack(k), pack(v), pack(do)
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
            return (lambda: hopper_fwd.launch_fwd(qp, kp, vp, cu, varlen=True, max_seqlen=max(lens), **hkw),
                    lambda: bwd_fn(dop, qp, kp, vp, cu, varlen=True, max_seqlen=max(lens), **kw))
        return (lambda: hopper_fwd.launch_fwd(q, k, v, seq, varlen=False, max_seqlen=N, **hkw),
                lambda: bwd_fn(do, q, k, v, seq, varlen=False, max_seqlen=N, **kw))
    if kernel in ("ours_varlen", "ours_dqtma_varlen", "ours_dqatomic_varlen"):
        pack = lambda t: torch.cat([t[i, :L] for i, L in enumerate(lens)])  # noqa: E731
        qp, kp, vp, dop = pack(q), pack(k), pack(v), pack(do)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        return (lambda: launch_fwd(qp, kp, vp, cu, varlen=True, max_seqlen=max(lens), **kw),
                lambda: launch_bwd(dop, qp, kp, vp, cu, varlen=True, max_seqlen=max(lens), deterministic=False,
                                   dq_tma=tma, **kw))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    if kernel == "tsig":
        import triton_sigmoid

        if pad:
            fwd = lambda: triton_sigmoid.sigmoid_attention_padded(qg, kg, vg, seq_lens_k=seq, seq_lens_q=seq)  # noqa
        else:
            fwd = lambda: triton_sigmoid.sigmoid_attention(qg, kg, vg)  # noqa: E731
    elif kernel in ("sdpa_flash", "sdpa_cudnn"):
        if pad:
            return None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if kernel == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        qt, kt, vt = (t.transpose(1, 2) for t in (qg, kg, vg))

        def fwd():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    elif kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
        qt, kt, vt = (t.transpose(1, 2) for t in (qg, kg, vg))

        def mask_mod(b, h, qi, kj):
            return (qi < seq[b]) & (kj < seq[b])

        bm = create_block_mask(mask_mod, B, None, N, N, device="cuda")

        def fwd():
            return flex(qt, kt, vt, block_mask=bm).transpose(1, 2)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    state = {}

    def bwd():
        if "out" not in state:
            state["out"] = fwd()
        return torch.autograd.grad(state["out"], (qg, kg, vg), do, retain_graph=True)

    return fwd, bwd


def peak_memory(kernel, D, N):
    """Peak extra GPU memory (GiB) of one forward + backward at p = 0, inputs excluded."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fns = make_runner(kernel, D, N, 0.0)
    fwd, bwd = fns
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fwd() if kernel.startswith("ours") else None  # the output held through the backward, as in training
    grads = bwd()  # (the other kernels' bwd runs fwd inside and keeps the graph)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del fns, fwd, bwd, grads, out
    return peak / 2**30


def cold_start(D, N):
    """Seconds of the first forward+backward call (compile + autotune) for a fresh key, and of a second call."""
    fwd, bwd = make_runner("ours_padded", D, N, 0.25)
    t0 = time.perf_counter()
    fwd(), bwd()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    fwd(), bwd()
    torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--pad", type=float, nargs="+", default=[0, 25, 50], help="padding percent")
    ap.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    ap.add_argument("--memory", action="store_true", help="peak memory at N=16384 vs SDPA flash")
    ap.add_argument("--cold-start", action="store_true", help="time the first call of a fresh autotune key")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")

    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
              "env": {k: v for k, v in os.environ.items() if k.startswith("SIGATTN_")},
              "setup": {"tokens": TOKENS, "hidden": HIDDEN, "dtype": "bfloat16", "causal": False,
                        "flops": "fwd 4*H*D*sum(L^2) on real tokens; bwd 2.5x"},
              "rows": []}
    try:
        import importlib.metadata as md

        result["versions"]["triton_sigmoid"] = md.version("triton-sigmoid")
    except Exception:  # noqa: BLE001 - optional anchor
        pass
    if args.cold_start:
        cold, warm = cold_start(args.d[0], 3000)
        result["cold_start_s"] = {"first_call": cold, "second_call": warm, "D": args.d[0], "N": 3000}
        print(f"cold start (compile+autotune, fwd+bwd, D={args.d[0]}): {cold:.1f} s; warm call {warm * 1e3:.2f} ms")
    # kernels in priority order (flex compiles per shape and goes last), so a time limit cuts anchors first
    order = [k for k in KERNELS if k in args.kernels]
    grid = [(D, N, p, kern) for kern in order for D in args.d for N in args.n for p in args.pad]
    for D, N, p, kern in tqdm(grid, desc="benchmark", mininterval=5):
        if kern == "ours_padded_det" and "bwd" not in args.modes:
            continue
        try:
            fns = make_runner(kern, D, N, p / 100)
        except Exception as e:  # noqa: BLE001 - record and continue
            result["rows"].append({"kernel": kern, "D": D, "N": N, "pad": p, "error": repr(e)[:300]})
            continue
        if fns is None:
            continue
        lens = lengths(N, p / 100)
        fl = flops_fwd(HIDDEN // D, D, lens)
        for mode, fn in zip(("fwd", "bwd"), fns):
            if mode not in args.modes or ((kern == "ours_padded_det" or "_dq" in kern) and mode == "fwd") or (
                    kern in ("hopper_padded", "hopper_varlen") and mode == "bwd"):  # their backward is ours_*'s
                continue
            try:
                fn()  # compile / autotune outside the timing
                torch.cuda.synchronize()
                ms = _bench(fn)
            except Exception as e:  # noqa: BLE001
                result["rows"].append({"kernel": kern, "D": D, "N": N, "pad": p, "mode": mode, "error": repr(e)[:300]})
                continue
            f = fl * (2.5 if mode == "bwd" else 1.0)
            result["rows"].append({"kernel": kern, "D": D, "N": N, "pad": p, "mode": mode, "ms": ms,
                                   "tflops": f / ms / 1e9, "B": len(lens), "H": HIDDEN // D,
                                   "real_tokens": sum(lens)})
        del fns
        torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))  # after every row: a time limit loses nothing
    if args.memory:
        result["memory_gib_N16384"] = {}
        for D in args.d:
            for kern in ("ours_padded", "sdpa_flash"):
                result["memory_gib_N16384"][f"{kern}_D{D}"] = peak_memory(kern, D, 16384)
        print("peak memory at N=16384 (GiB):", json.dumps(result["memory_gib_N16384"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)


def _get(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and "tflops" in r:
            return r["tflops"]
    return math.nan


def print_table(result):
    rows = result["rows"]
    print(f"\n{result['device']}  torch {result['versions']['torch']}  triton {result['versions']['triton']}")
    hdr = ("D", "N", "pad", "mode", "hop_pad", "hop_vl", "hbwd_pad", "hbwd5_pad", "ours_pad", "ours_vl", "tsig", "flash", "cudnn",
           "flex", "hop/tsig", "hop/ours", "hpad/dns", "hvl/hpad")
    print(" ".join(f"{h:>9}" for h in hdr))
    keys = sorted({(r["D"], r["N"], r["pad"], r["mode"]) for r in rows if "mode" in r})
    for D, N, p, mode in keys:
        g = lambda k, pp=p: _get(rows, kernel=k, D=D, N=N, pad=pp, mode=mode)  # noqa: E731
        hp, hv, ours, vl, ts = g("hopper_padded"), g("hopper_varlen"), g("ours_padded"), g("ours_varlen"), g("tsig")
        dense = _get(rows, kernel="hopper_padded", D=D, N=N, pad=0, mode=mode)
        vals = (hp, hv, g("hopper_bwd_padded"), g("hopper_bwd5_padded"), ours, vl, ts, g("sdpa_flash"), g("sdpa_cudnn"), g("flex"), hp / ts, hp / ours, hp / dense,
                hv / hp)
        print(f"{D:>9} {N:>9} {p:>9g} {mode:>9} " + " ".join(f"{x:>9.2f}" if x < 10 else f"{x:>9.0f}" for x in vals))


if __name__ == "__main__":
    main()
