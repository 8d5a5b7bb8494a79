"""Time candidate fixed launch configs (``SIGATTN_NO_AUTOTUNE=1``) of the portable Triton kernels against autotuning.

Same setup as benchmarks/attention.py (bf16, 16,384 tokens per step, hidden 2048, −log n bias, padded layout,
dense). For each candidate (BLOCK_M, BLOCK_N, warps, stages) the fixed config of the chosen kernel kind is replaced
and the kernel timed; "autotune" runs the autotuned launcher. Used to pick ``triton_tuning.FIXED``.

    python benchmarks/attention_fixed_configs.py --kind bwd --d 128 --configs 32,128,4,3 64,128,8,3 --out x.json
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import HIDDEN, _bench, _tensors, flops_fwd  # noqa: E402

from sigattn import triton_tuning as tuning  # noqa: E402
from sigattn.triton_bwd import launch_bwd  # noqa: E402
from sigattn.triton_fwd import launch_fwd  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["fwd", "bwd"], default="bwd")
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--configs", nargs="+", required=True, help="BLOCK_M,BLOCK_N,warps,stages each")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("SIGATTN_COMMIT"), "kind": args.kind,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "rows": []}
    for D in args.d:
        for N in args.n:
            B, H = 16384 // N, HIDDEN // D
            q, k, v, do = _tensors(B, N, H, D)
            seq = torch.full((B, ), N, dtype=torch.int32, device="cuda")
            kw = dict(varlen=False, max_seqlen=N, scale=D ** -0.5, bias=0.0, log_n_bias=True, causal=False)
            if args.kind == "fwd":
                fn, fl = (lambda: launch_fwd(q, k, v, seq, **kw)), flops_fwd(H, D, [N] * B)
            else:
                fn = lambda: launch_bwd(do, q, k, v, seq, deterministic=False, **kw)  # noqa: E731
                fl = 2.5 * flops_fwd(H, D, [N] * B)
            key = (args.kind, tuning.size_class(max(16, D)))
            line = []
            for name in args.configs + ["autotune"]:
                saved = tuning.FIXED[key]
                if name == "autotune":
                    os.environ.pop("SIGATTN_NO_AUTOTUNE", None)
                else:
                    os.environ["SIGATTN_NO_AUTOTUNE"] = "1"
                    bm, bn, w, s = (int(x) for x in name.split(","))
                    tuning.FIXED[key] = tuning._cfg(bm, bn, w, s)
                try:
                    fn()
                    torch.cuda.synchronize()
                    ms = _bench(fn)
                    res["rows"].append({"config": name, "D": D, "N": N, "ms": ms, "tflops": fl / ms / 1e9})
                    line.append(f"{name} {fl / ms / 1e9:.0f}")
                except Exception as e:  # noqa: BLE001 - record and continue
                    res["rows"].append({"config": name, "D": D, "N": N, "error": repr(e)[:300]})
                    line.append(f"{name} ERROR")
                finally:
                    tuning.FIXED[key] = saved
            print(f"{args.kind} D={D} N={N}: " + " | ".join(line), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
