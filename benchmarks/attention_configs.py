"""Launch-config sweep of the portable Triton kernels (GPU): TFLOP/s of each tile, checked against the shipped choice.

For every head dim, sequence length and tile (``BM,BN,WARPS,STAGES``; default: the kernel's autotune set for that
head dim), the kernel runs with that one config (``SIGATTN_NO_AUTOTUNE=1`` and the fixed-config table pointed at
it), timed by median (``triton.testing.do_bench``), and its outputs are compared with the autotuned call's (the
shipped behaviour): a tile whose relative error exceeds ``--tol`` is marked ``wrong`` — a tile goes into an autotune
set only when it is both faster and right. Backward: the K/V kernel with dQ as the trainer's layout does it (varlen:
TMA reductions on sm90) unless ``--dq`` says otherwise. bf16, 16,384 tokens per step, hidden 2048, no padding.

    python benchmarks/attention_configs.py --d 64 --n 4096 8192 --layout varlen --kinds bwd \\
        --tiles 64,128,8,3 32,128,8,3 32,256,8,3 32,256,16,3 --out configs.json
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import HIDDEN, TOKENS, flops_fwd  # noqa: E402
from benchmarks.provenance import commit  # noqa: E402
from sigattn import triton_tuning as tuning  # noqa: E402
from sigattn.triton_bwd import launch_bwd  # noqa: E402
from sigattn.triton_fwd import launch_fwd  # noqa: E402


def parse_tile(text: str) -> triton.Config:
    try:
        bm, bn, warps, stages = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--tiles: {text!r} is not BM,BN,WARPS,STAGES (e.g. 32,256,8,3)") from None
    return tuning._cfg(bm, bn, warps, stages)


def inputs(D: int, N: int, layout: str):
    H, B = HIDDEN // D, TOKENS // N
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (B * N, H, D) if layout == "varlen" else (B, N, H, D)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    info = (torch.arange(0, B * N + 1, N, dtype=torch.int32, device="cuda") if layout == "varlen"
            else torch.full((B,), N, dtype=torch.int32, device="cuda"))
    return q, k, v, do, info, flops_fwd(H, D, [N] * B)


def call(kind, q, k, v, do, info, N, layout, dq_tma):
    kw = dict(varlen=layout == "varlen", max_seqlen=N, scale=q.shape[-1] ** -0.5, bias=0.0, log_n_bias=True,
              causal=False)
    if kind == "fwd":
        return lambda: (launch_fwd(q, k, v, info, **kw),)
    return lambda: launch_bwd(do, q, k, v, info, deterministic=False, dq_tma=dq_tma, **kw)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def use_fixed(kind: str, cfg) -> None:
    """Point the fixed-config table at ``cfg`` for every head dim (``tuning.fixed`` reads it at call time)."""
    for size in ("small", "large"):
        tuning.FIXED[(kind, size)] = cfg
    if kind == "bwd":
        tuning.FIXED_BWD_D128 = cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, nargs="+", default=[4096])
    ap.add_argument("--layout", choices=("padded", "varlen"), default="varlen")
    ap.add_argument("--kinds", nargs="+", choices=("fwd", "bwd"), default=["fwd", "bwd"])
    ap.add_argument("--tiles", nargs="+", help="BM,BN,WARPS,STAGES each (default: the autotune set of the head dim)")
    ap.add_argument("--dq", choices=("default", "tma", "atomics"), default="default",
                    help="the backward's dQ (default: as the ops choose for the layout)")
    ap.add_argument("--tol", type=float, default=2e-2, help="largest relative error against the autotuned call")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_configs.py needs a CUDA GPU")
    tiles = [parse_tile(t) for t in a.tiles] if a.tiles else None
    dq_tma = None if a.dq == "default" else a.dq == "tma"
    result = {"device": torch.cuda.get_device_name(), "commit": commit(), "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "layout": a.layout, "dq": a.dq,
              "tokens": TOKENS, "hidden": HIDDEN, "rows": []}
    for D in a.d:
        for N in a.n:
            q, k, v, do, info, fl = inputs(D, N, a.layout)
            for kind in a.kinds:
                os.environ.pop("SIGATTN_NO_AUTOTUNE", None)
                auto = call(kind, q, k, v, do, info, N, a.layout, dq_tma)
                ref = [t.clone() for t in auto()]
                ms_auto = triton.testing.do_bench(auto, warmup=10, rep=40, return_mode="median")
                mult = 2.5 if kind == "bwd" else 1.0
                row = dict(D=D, N=N, kind=kind, cfg="autotuned", ms=ms_auto, tflops=fl * mult / ms_auto / 1e9)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                table = tuning.BWD_CONFIGS if kind == "bwd" else tuning.FWD_CONFIGS
                os.environ["SIGATTN_NO_AUTOTUNE"] = "1"
                saved = dict(tuning.FIXED), tuning.FIXED_BWD_D128
                try:
                    for cfg in tiles or table[tuning.size_class(D)]:
                        use_fixed(kind, cfg)
                        fn = call(kind, q, k, v, do, info, N, a.layout, dq_tma)
                        try:
                            out = fn()
                            err = max(rel_err(o, r) for o, r in zip(out, ref))
                            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                            row = dict(D=D, N=N, kind=kind, cfg=str(cfg), ms=ms, tflops=fl * mult / ms / 1e9,
                                       vs_autotuned=ms_auto / ms, rel_err=err, wrong=err > a.tol)
                        except Exception as e:  # noqa: BLE001  (a tile that does not build/launch is a row too)
                            row = dict(D=D, N=N, kind=kind, cfg=str(cfg), error=repr(e)[:200])
                        result["rows"].append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    tuning.FIXED.clear()
                    tuning.FIXED.update(saved[0])
                    tuning.FIXED_BWD_D128 = saved[1]
                    os.environ.pop("SIGATTN_NO_AUTOTUNE", None)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
