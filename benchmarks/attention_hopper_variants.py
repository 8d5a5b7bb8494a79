"""Time variants of the Gluon Hopper forward side by side (tilings, consumer layouts, timing probes), one process.

Same setup as benchmarks/attention.py (bf16, 16,384 tokens per step, hidden 2048, −log n bias, padding p: lengths
spread over [(1−2p)·N, N]); every variant runs on the same inputs in the same run, plus the portable Triton
forward (fixed config unless autotuning is on) as the in-run baseline. A probe variant (``probe=1``: sigmoid
skipped) measures what the sigmoid costs: METHOD's drop-one-stage difference. ``--base NAME=FILE`` loads another
copy of the kernel module (e.g. the previous commit's, ``git show REV:sigattn/hopper_fwd.py > build/base.py``) so
that configs written ``NAME:config`` run the old code side by side with the new in the same run. ``--layouts``
times the padded call, the varlen (packed) call, or both.

    python benchmarks/attention_hopper_variants.py --d 128 --n 1024 4096 --configs 128,64,4,1 128,64,4,2 \
        --probe --out benchmarks/results/attention_hopper_variants_d128.json
"""

import argparse
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import HIDDEN, _bench, _tensors, flops_fwd, lengths  # noqa: E402

from sigattn import hopper_fwd  # noqa: E402
from sigattn.triton_fwd import launch_fwd  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--pad", type=float, nargs="+", default=[0])
    ap.add_argument("--configs", nargs="+", required=True, help="BLOCK_M,BLOCK_N,STAGES,CONSUMERS each")
    ap.add_argument("--probe", action="store_true", help="also time each config with the sigmoid skipped")
    ap.add_argument("--base", action="append", default=[], metavar="NAME=FILE",
                    help="another copy of sigattn/hopper_fwd.py; configs 'NAME:BM,BN,...' run on it")
    ap.add_argument("--layouts", nargs="+", choices=("padded", "varlen"), default=["padded"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    modules = {"": hopper_fwd}
    for spec in args.base:
        name, path = spec.split("=", 1)
        ms = importlib.util.spec_from_file_location(f"hopper_fwd_{name}", path)
        modules[name] = importlib.util.module_from_spec(ms)
        ms.loader.exec_module(modules[name])

    def parse(c):
        name, _, cfg = c.rpartition(":")
        if name not in modules:
            raise SystemExit(f"config {c!r}: no --base named {name!r}")
        return modules[name], tuple(int(x) for x in cfg.split(","))

    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("SIGATTN_COMMIT"),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__},
           "env": {k: v for k, v in os.environ.items() if k.startswith("SIGATTN_")}, "rows": []}
    for D in args.d:
        for N in args.n:
            for p in args.pad:
                lens = lengths(N, p / 100)
                B, H = len(lens), HIDDEN // D
                q, k, v, _ = _tensors(B, N, H, D)
                seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
                cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
                packed = [torch.cat([t[i, :L] for i, L in enumerate(lens)]) for t in (q, k, v)]
                kw = dict(scale=D ** -0.5, bias=0.0, log_n_bias=True, causal=False)
                fl = flops_fwd(H, D, lens)
                ref = launch_fwd(q, k, v, seq, varlen=False, max_seqlen=N, **kw)
                ref_vl = torch.cat([ref[i, :L] for i, L in enumerate(lens)])
                variants = [("portable", None, None, 0)] + [(c, *parse(c), 0) for c in args.configs]
                if args.probe:
                    variants += [(c + "+nosigmoid", *parse(c), 1) for c in args.configs]
                for layout in args.layouts:
                    line = []
                    for name, mod, cfg, probe in variants:
                        if cfg is None and layout == "padded":
                            fn = lambda: launch_fwd(q, k, v, seq, varlen=False, max_seqlen=N, **kw)  # noqa: E731
                        elif cfg is None:
                            fn = lambda: launch_fwd(*packed, cu, varlen=True, max_seqlen=max(lens), **kw)  # noqa
                        elif layout == "padded":
                            fn = lambda mod=mod, cfg=cfg, probe=probe: mod.launch_fwd(  # noqa: E731
                                q, k, v, seq, varlen=False, max_seqlen=N, config=cfg, probe=probe, **kw)
                        else:
                            fn = lambda mod=mod, cfg=cfg, probe=probe: mod.launch_fwd(  # noqa: E731
                                *packed, cu, varlen=True, max_seqlen=max(lens), config=cfg, probe=probe, **kw)
                        want = ref if layout == "padded" else ref_vl
                        try:
                            out = fn()
                            torch.cuda.synchronize()
                            err = None if probe else ((out.float() - want.float()).norm() / want.float().norm()).item()
                            ms = _bench(fn)
                        except Exception as e:  # noqa: BLE001 - record and continue
                            res["rows"].append({"variant": name, "layout": layout, "D": D, "N": N, "pad": p,
                                                "error": repr(e)[:300]})
                            line.append(f"{name}: ERROR")
                            continue
                        res["rows"].append({"variant": name, "layout": layout, "D": D, "N": N, "pad": p, "ms": ms,
                                            "tflops": fl / ms / 1e9, "rel_err_vs_portable": err})
                        line.append(f"{name} {fl / ms / 1e9:.0f}")
                    print(f"D={D} N={N} pad={p:g} {layout}: " + " | ".join(line), flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
