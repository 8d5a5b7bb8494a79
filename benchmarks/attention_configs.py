"""Config sweep for our Triton kernels (GPU): TFLOP/s of every launch config, both sigmoid forms, atomic vs
deterministic dQ, at D ∈ {64, 128}, N = 4096, bf16, no padding, 16,384 tokens per step, hidden 2048.
Shows how far each knob moves the kernels (docs/performance.md).

    python benchmarks/attention_configs.py --out benchmarks/results/attention_configs.json
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import HIDDEN, flops_fwd, lengths  # noqa: E402
from sigattn import triton_tuning as tuning  # noqa: E402
from sigattn.triton_bwd import launch_bwd  # noqa: E402
from sigattn.triton_fwd import launch_fwd  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ["SIGATTN_NO_AUTOTUNE"] = "1"
    rows = []
    for D in (64, 128):
        H, N = HIDDEN // D, args.n
        lens = lengths(N, 0.0)
        q, k, v, do = (torch.randn(len(lens), N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
        fl = flops_fwd(H, D, lens)
        kw = dict(varlen=False, max_seqlen=N, scale=D ** -0.5, bias=0.0, log_n_bias=True, causal=False)
        for kind, table in (("fwd", tuning.FWD_CONFIGS), ("bwd", tuning.BWD_CONFIGS)):
            for cfg in table["small"]:
                for fast in ("1", "0"):
                    for det in ((False, True) if kind == "bwd" else (False,)):
                        os.environ["SIGATTN_FAST_SIGMOID"] = fast
                        tuning.FIXED[(kind, "small")] = cfg
                        if kind == "fwd":
                            fn = lambda: launch_fwd(q, k, v, seq, **kw)  # noqa: E731
                        else:
                            fn = lambda: launch_bwd(do, q, k, v, seq, deterministic=det, **kw)  # noqa: E731
                        try:
                            fn()
                            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                            tf = fl * (2.5 if kind == "bwd" else 1) / ms / 1e9
                        except Exception as e:  # noqa: BLE001
                            ms, tf = None, repr(e)[:120]
                        row = dict(D=D, N=N, kind=kind, cfg=str(cfg), fast_sigmoid=fast == "1",
                                   deterministic=det, ms=ms, tflops=tf)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
