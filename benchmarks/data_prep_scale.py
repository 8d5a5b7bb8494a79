"""data_prep at CellxGene scale: build ≥ 1M synthetic census cells, then stream them back on N ranks.

1. **Generate** ``--cells`` cells in ``--datasets`` CellxGene-schema h5ad files
   (``python -m data_prep.synth_census``, one process; CPU-seconds and peak RSS recorded).
2. **Build** corpora of the first files making up each of ``--sizes`` cells (250K, 500K, 1M by
   default), each by ``python -m data_prep build`` in its own process: CPU-seconds (user + kernel, of
   the process and its workers, from ``os.wait4``), peak RSS (``ru_maxrss``), wall, phase timings.
   Peak RSS should stay flat and CPU time grow linearly with the corpus.
3. **Load** the largest corpus on ``--ranks`` ranks, each its own process with the environment
   mosaicml-streaming reads (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and its own
   DataLoader workers (``--num-workers``); per rank: cells, wall, CPU-seconds (the rank and its
   workers), cells/s and cells per CPU-second, with the real tokenizer on the first ``--cells-tput``
   cells per rank at 2K and at 8K context.
4. **Exact resume** over one whole epoch: phase A reads ``--resume-at`` of each rank's batches and
   saves ``StreamingDataLoader.state_dict()``; phase B starts fresh rank processes that
   ``load_state_dict`` it and read the rest. Over all ranks and both phases every train cell must be
   seen exactly once, except the samples streaming repeats to pad the split to a multiple of the
   ranks (``< ranks``; counted).

Every stage's record is kept in ``--work`` (``generate.json``, ``build-N.json``), so a run stopped
part way (``--stop-after``) goes on from there.

Targets: per rank ≥ 10× what one H100 consumes (``benchmarks/results/training_h100.json``, 160m
sigmoid: 2K ≈ 132 cells/s, 8K ≈ 18 cells/s) on 2 CPU cores per rank.

    python benchmarks/data_prep_scale.py [--cells 1000000 --datasets 8 --sizes 250000,500000,1000000
        --ranks 8 --num-workers 1 --work /tmp/sigattn_scale --out benchmarks/results/data_prep_scale.json]

Generated data lives under ``--work`` and is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere

import numpy as np  # noqa: E402

H100_JSON = os.path.join(ROOT, "benchmarks", "results", "training_h100.json")


def h100_cells_per_s() -> dict[int, float]:
    """Measured 160m sigmoid training throughput on one H100, cells/s by context."""
    with open(H100_JSON) as f:
        rows = json.load(f)["rows"]
    return {r["context"]: round(r["cells_per_s"], 1) for r in rows if r["size"] == "160m" and r["attention"] == "sigmoid"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its CPU-seconds (user/kernel, with its waited-for children), peak RSS and wall."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env or _env(), cwd=ROOT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed with exit code {p.returncode}")
    return {"wall_s": round(wall, 2), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------- generate

def generate(work: str, cells: int, datasets: int, extra: list[str]) -> dict:
    out = os.path.join(work, "h5ad")
    rec = run_measured([sys.executable, "-m", "data_prep.synth_census", out, "--cells", str(cells),
                        "--datasets", str(datasets), *extra])
    from data_prep.synth_census import length_summary
    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".h5ad"))
    return {"cells": cells, "datasets": datasets, "files": files, "bytes": sum(map(os.path.getsize, files)),
            "expressed_genes_per_cell": length_summary(files), **rec,
            "cells_per_cpu_s": round(cells / rec["cpu_s"])}


# ------------------------------------------------------------------------------------------------- build

def build_corpus(files: list[str], out: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    rec = run_measured([sys.executable, "-m", "data_prep", "build", *files, "--out", out, "--workers", str(workers)])
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    n, nnz = m["totals"]["cells_in"], sum(d["nnz"] for d in m["datasets"])
    return {"n_cells": n, "files": len(files), "cells_out": m["totals"]["cells_out"],
            "cells_in_mds": m["totals"]["cells_in_mds"], "nnz": nnz, "workers": workers, **rec,
            "cells_per_cpu_s": round(n / rec["cpu_s"]), "ns_per_nnz_cpu": round(rec["cpu_s"] / nnz * 1e9, 1),
            "phases_s": m["timings_s"], "zarr_bytes": du(os.path.join(out, "zarr")),
            "mds_bytes": du(os.path.join(out, "mds")), "n_train": m["split"]["n_cells"]["train"],
            "shards": m["mds"]["shards"]}


# ------------------------------------------------------------------------------------------------ loader

def _ids_only_tokenizer():
    from data_prep.tokenize import CellTokenizer

    class IdsOnly(CellTokenizer):
        """A cell as its CLS token alone: the stream (shards, decoding, order, state) without tokenisation."""

        def __call__(self, genes, counts, cell_id: int = 0, epoch: int = 0) -> dict:
            import torch
            return {"input_ids": torch.ones(1, dtype=torch.int64),
                    "values": torch.full((1,), self.value_cls, dtype=torch.int64), "length": 1}

    return IdsOnly


def IdsOnlyTokenizer(*args, **kw):  # noqa: N802  (a class made on first use: the module imports no torch)
    return _ids_only_tokenizer()(*args, **kw)


def _rank_cpu_s() -> float:
    """CPU-seconds so far of this rank's process and its live child processes (its DataLoader
    workers; user + kernel)."""
    import psutil  # a DeepSpeed dependency
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def rank_main(a: argparse.Namespace) -> None:
    """One rank (its own process): read ``--limit`` batches (all when 0), save ids, stats, state."""
    from data_prep.loader import build_loader
    from data_prep.tokenize import CellTokenizer
    from data_prep.vocab import GeneVocab

    rank = int(os.environ["RANK"])
    vocab = GeneVocab.load(os.path.join(a.corpus, "vocab.tsv"))
    tok = (CellTokenizer if a.tokenizer == "real" else IdsOnlyTokenizer)(len(vocab), a.context, n_bins=51, seed=0)
    dl = build_loader(a.corpus, "train", tokenizer=tok, batch_size=a.batch_size, seed=a.seed,
                      num_workers=a.num_workers)
    if a.state_in:
        with open(a.state_in) as f:
            dl.load_state_dict(json.load(f))
    bar = None
    if rank == 0 and not a.quiet:
        from tqdm.auto import tqdm
        bar = tqdm(total=a.limit or None, desc=f"rank 0 {a.context // 1024}K", unit="batch", leave=False)
    s0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    ids, tokens, n_batches, cells, steady = [], 0, 0, 0, None
    it = iter(dl)
    for b in it:
        ids.append(b["cell_id"].numpy())
        tokens += len(b["input_ids"])
        cells += len(ids[-1])
        n_batches += 1
        if bar is not None:
            bar.update()
        if n_batches == a.warmup:  # steady state from here: workers started, shards open, imports done
            steady = (cells, _rank_cpu_s(), time.perf_counter())
        if a.limit and n_batches == a.limit:
            break
    wall = time.perf_counter() - t0
    if steady is not None:
        steady = {"steady_cells": cells - steady[0], "steady_cpu_s": _rank_cpu_s() - steady[1],
                  "steady_wall_s": time.perf_counter() - steady[2]}
    state = dl.state_dict() if a.state_out else None
    del it, dl  # joins the DataLoader workers, so their CPU time is in RUSAGE_CHILDREN
    import gc
    gc.collect()
    s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if bar is not None:
        bar.close()
    cpu = (s1.ru_utime - s0.ru_utime) + (s1.ru_stime - s0.ru_stime) + c1.ru_utime + c1.ru_stime
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    np.save(a.ids_out, ids)
    if state is not None:
        with open(a.state_out, "w") as f:
            json.dump(state, f)
    with open(a.stats_out, "w") as f:
        json.dump({"rank": rank, "cells": len(ids), "batches": n_batches, "tokens": tokens, "wall_s": wall,
                   "cpu_s": cpu, "peak_rss_mb": s1.ru_maxrss / 1024, **(steady or {})}, f)
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()


def run_ranks(corpus: str, work: str, tag: str, ranks: int, context: int, batch_size: int, num_workers: int,
              limit: int = 0, state_in: str | None = None, save_state: bool = False, seed: int = 0,
              quiet: bool = False, tokenizer: str = "real", warmup: int = 0) -> list[dict]:
    """Start ``ranks`` rank processes at once (one node), wait; per rank: stats + ids (+ state path)."""
    procs = []
    for r in range(ranks):
        pre = os.path.join(work, f"{tag}-r{r}")
        cmd = [sys.executable, os.path.abspath(__file__), "_rank", "--corpus", corpus, "--context", str(context),
               "--batch-size", str(batch_size), "--num-workers", str(num_workers), "--limit", str(limit),
               "--seed", str(seed), "--ids-out", pre + ".npy", "--stats-out", pre + ".json", "--tokenizer", tokenizer,
               "--warmup", str(warmup)]
        cmd += ["--state-in", state_in] if state_in else []
        cmd += ["--state-out", pre + ".state.json"] if save_state else []
        cmd += ["--quiet"] if quiet else []
        env = {**_env(), "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
    for p in procs:
        if p.wait():
            for q in procs:
                q.kill()
            raise RuntimeError(f"a rank process ({tag}) failed with exit code {p.returncode}")
    out = []
    for r in range(ranks):
        pre = os.path.join(work, f"{tag}-r{r}")
        with open(pre + ".json") as f:
            st = json.load(f)
        st["ids"] = np.load(pre + ".npy")
        st["state"] = pre + ".state.json" if save_state else None
        out.append(st)
    return out


def rank_summary(stats: list[dict], context: int, h100: float | None) -> dict:
    """Per rank and median: cells/s, cells per CPU-second (whole run, start-up included) and, where
    measured, in steady state (after the warm-up batches: what a long training run sees)."""
    cells = [s["cells"] for s in stats]
    per_rank = [s["cells"] / s["wall_s"] for s in stats]
    per_cpu = [s["cells"] / s["cpu_s"] for s in stats]
    steady = {}
    # the steady phase is reported only where every rank's was long enough for the CPU clock (10 ms ticks) to see
    if all(s.get("steady_cpu_s", 0) > 0 for s in stats):
        sc = [s["steady_cells"] / s["steady_cpu_s"] for s in stats]
        steady = {"steady_cells_per_rank": [s["steady_cells"] for s in stats],
                  "steady_cells_per_cpu_s_per_rank": [round(x) for x in sc],
                  "median_steady_cells_per_cpu_s": round(float(np.median(sc))),
                  "projected_steady_cells_per_s_per_rank_on_2_cores": round(2 * float(np.median(sc)))}
    return {"context": context, "ranks": len(stats), "cells_per_rank": cells, **steady,
            "tokens_per_cell": round(sum(s["tokens"] for s in stats) / max(sum(cells), 1), 1),
            "wall_cells_per_s_per_rank": [round(x) for x in per_rank],
            "cells_per_cpu_s_per_rank": [round(x) for x in per_cpu],
            "median_cells_per_cpu_s": round(float(np.median(per_cpu))),
            "projected_cells_per_s_per_rank_on_2_cores": round(2 * float(np.median(per_cpu))),
            "rank_cpu_s": [round(s["cpu_s"], 1) for s in stats],
            "rank_peak_rss_mb": [round(s["peak_rss_mb"], 1) for s in stats],
            "h100_cells_per_s": h100, "target_per_rank": round(10 * h100, 1) if h100 else None}


def check_resume(phase_a: list[np.ndarray], phase_b: list[np.ndarray], n_train: int) -> dict:
    """Over ranks and both phases: every train cell once, repeats only streaming's padding (< ranks)."""
    ranks = len(phase_a)
    seen = np.concatenate([*phase_a, *phase_b]) if ranks else np.zeros(0, np.int64)
    uniq, counts = np.unique(seen, return_counts=True)
    per_rank = [len(a) + len(b) for a, b in zip(phase_a, phase_b)]
    padded = ranks * -(-n_train // ranks) if ranks else 0
    repeats = int((counts - 1).sum())
    rec = {"n_train": n_train, "seen": len(seen), "unique": len(uniq), "repeated": repeats,
           "padding_expected": padded - n_train, "per_rank": per_rank,
           "phase_a_cells": int(sum(map(len, phase_a))), "phase_b_cells": int(sum(map(len, phase_b)))}
    problems = []
    if len(uniq) != n_train:
        problems.append(f"{n_train - len(uniq)} train cells never seen" if len(uniq) < n_train
                        else f"{len(uniq) - n_train} cells seen that are not in the train split")
    if repeats != padded - n_train:
        problems.append(f"{repeats} cells seen twice (streaming pads {padded - n_train})")
    if len(set(per_rank)) > 1:
        problems.append(f"ranks saw unequal numbers of cells: {per_rank}")
    rec["exact"] = not problems
    rec["problems"] = problems
    return rec


def bench_loader(corpus: str, work: str, n_train: int, ranks: int, num_workers: int, batch_size: int,
                 resume_at: float, cells_tput: int, h100: dict[int, float], quiet: bool = False,
                 resume_tokenizer: str = "ids") -> dict:
    """Throughput with the real tokenizer (``cells_tput`` cells per rank at 2K and at 8K; steady state
    after the first eighth of the batches), then one
    whole epoch split at ``resume_at`` into two sets of rank processes, checked by :func:`check_resume`.

    ``resume_tokenizer="ids"`` reads the epoch through the same StreamingDataset, shards, sample
    decoding, packing and ``StreamingDataLoader`` state, with tokenisation replaced by a CLS-only
    stand-in (tokenising a whole 1M-cell epoch would cost ~10 CPU-minutes that measure nothing new).
    """
    tput = {}
    for ctx, bs in ((2048, batch_size), (8192, max(1, batch_size // 4))):
        n = max(1, cells_tput // bs)
        st = run_ranks(corpus, work, f"t{ctx}", ranks, ctx, bs, num_workers, limit=n, quiet=quiet,
                       warmup=max(1, n // 8))
        tput[f"ctx_{ctx // 1024}k"] = {"batch_size": bs, **rank_summary(st, ctx, h100.get(ctx))}
    per_rank = -(-n_train // ranks)  # streaming pads the split to a multiple of the ranks
    per_rank_batches = -(-per_rank // batch_size)
    stop = max(1, int(resume_at * per_rank_batches))
    a = run_ranks(corpus, work, "a", ranks, 2048, batch_size, num_workers, limit=stop, save_state=True,
                  quiet=quiet, tokenizer=resume_tokenizer)
    states = [json.load(open(s["state"])) for s in a]
    b = run_ranks(corpus, work, "b", ranks, 2048, batch_size, num_workers, state_in=a[0]["state"], quiet=quiet,
                  tokenizer=resume_tokenizer)
    resume = check_resume([s["ids"] for s in a], [s["ids"] for s in b], n_train)
    resume.update(tokenizer=resume_tokenizer, batch_size=batch_size, batches_phase_a=stop,
                  batches_per_rank=per_rank_batches, states_equal_across_ranks=all(x == states[0] for x in states),
                  state=states[0])
    both = [{**x, "cells": x["cells"] + y["cells"], "tokens": x["tokens"] + y["tokens"], "wall_s": x["wall_s"] + y["wall_s"],
             "cpu_s": x["cpu_s"] + y["cpu_s"], "peak_rss_mb": max(x["peak_rss_mb"], y["peak_rss_mb"])} for x, y in zip(a, b)]
    resume["stream_only"] = rank_summary(both, 2048, None)
    for f in os.listdir(work):
        if f[:2] in ("a-", "b-") or f.startswith(("t2048-", "t8192-")):
            os.remove(os.path.join(work, f))
    return {"num_workers": num_workers, **tput, "resume": resume}


# -------------------------------------------------------------------------------------------------- main

def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.2))
    bl = res["build"]
    n = np.array([b["n_cells"] for b in bl]) / 1e3
    a1.plot(n, [b["cpu_s"] for b in bl], "o-", label="build CPU-s (user+kernel)")
    a1.plot(n, [b["wall_s"] for b in bl], "s--", color="gray", label="build wall s (loaded box)")
    if len(bl) > 1:
        k = bl[-1]["cpu_s"] / bl[-1]["n_cells"]
        a1.plot([0, n[-1]], [0, k * n[-1] * 1e3], ":", color="tab:blue", label="linear through the largest")
    a1.set_xlabel("cells in the corpus (thousands)")
    a1.set_ylabel("seconds")
    a1.set_title("build time vs corpus size")
    a1.legend(fontsize=8)
    a2.plot(n, [b["peak_rss_mb"] for b in bl], "o-", color="tab:red", label="build peak RSS")
    a2.set_ylim(0, 1.3 * max(b["peak_rss_mb"] for b in bl))
    a2.set_xlabel("cells in the corpus (thousands)")
    a2.set_ylabel("MB")
    a2.set_title("build peak RSS (getrusage)")
    a2.legend(fontsize=8)
    ld = res["loader"]
    labels, vals, targets = [], [], []
    for key in ("ctx_2k", "ctx_8k"):
        s = ld[key]
        labels += [f"{s['context'] // 1024}K per CPU-s", f"{s['context'] // 1024}K ×2 cores"]
        vals += [s["median_cells_per_cpu_s"], s["projected_cells_per_s_per_rank_on_2_cores"]]
        targets += [s["target_per_rank"]] * 2
    a3.bar(labels, vals, color=["tab:green", "tab:olive"] * 2)
    for i, t in enumerate(targets):
        a3.plot([i - 0.4, i + 0.4], [t, t], "r--", label="10× one H100" if i == 0 else None)
    a3.set_yscale("log")
    a3.set_ylabel("cells / s per rank")
    a3.set_title(f"loader, {ld['ctx_2k']['ranks']} ranks × {ld['num_workers']} workers (median rank)")
    a3.legend(fontsize=8)
    fig.suptitle(f"data_prep at scale: synthetic census, {res['generate']['cells']:,} cells "
                 f"(2-core box shared with other jobs: CPU-seconds, not wall)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _record(path: str, make):
    """``make()`` once: its result is kept in ``path`` (JSON), so an interrupted run picks up where it was."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    rec = make()
    with open(path, "w") as f:
        json.dump(rec, f)
    return rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--sizes", default="250000,500000,1000000", help="corpus sizes to build (multiples of a file)")
    ap.add_argument("--synth-args", default="", help="extra arguments for data_prep.synth_census (tests)")
    ap.add_argument("--workers", type=int, default=1, help="build --workers")
    ap.add_argument("--parallel-builds", action="store_true",
                    help="run the builds of all sizes at once (each its own process; CPU and RSS still per build)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per rank")
    ap.add_argument("--batch-size", type=int, default=64, help="cells per rank per batch at 2K (8K: a quarter)")
    ap.add_argument("--resume-at", type=float, default=0.4, help="share of each rank's batches before the restart")
    ap.add_argument("--cells-tput", type=int, default=16384,
                    help="cells per rank read with the real tokenizer (the first eighth is warm-up)")
    ap.add_argument("--resume-tokenizer", choices=("ids", "real"), default="ids",
                    help="tokenizer of the whole-epoch resume check (ids: CLS-only stand-in)")
    ap.add_argument("--work", default="/tmp/sigattn_scale")
    ap.add_argument("--stop-after", choices=("generate", "build", "loader"), default="loader")
    ap.add_argument("--keep", action="store_true", help="keep generated files and corpora")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", default="benchmarks/results/data_prep_scale.json")
    ap.add_argument("--plot", default="benchmarks/results/data_prep_scale.png")
    a = ap.parse_args(argv)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    per_file = a.cells // a.datasets
    if a.cells % a.datasets or any(s % per_file or s > a.cells for s in sizes):
        raise SystemExit(f"--sizes must be multiples of one file ({per_file} cells) up to --cells")
    os.makedirs(a.work, exist_ok=True)
    load0, t0 = os.getloadavg(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = False
    try:
        gen = _record(os.path.join(a.work, "generate.json"),
                      lambda: generate(a.work, a.cells, a.datasets, a.synth_args.split()))
        if a.stop_after == "generate":
            return gen

        def one(s):
            return _record(os.path.join(a.work, f"build-{s}.json"), lambda: build_corpus(
                gen["files"][: s // per_file], os.path.join(a.work, f"corpus-{s}"), a.workers))

        if a.parallel_builds:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(sizes)) as ex:
                builds = list(ex.map(one, sizes))
        else:
            builds = [one(s) for s in sizes]
        for s in sizes[:-1]:
            shutil.rmtree(os.path.join(a.work, f"corpus-{s}"), ignore_errors=True)
        if a.stop_after == "build":
            return {"build": builds}
        loader = bench_loader(os.path.join(a.work, f"corpus-{sizes[-1]}"), a.work, builds[-1]["n_train"], a.ranks,
                              a.num_workers, a.batch_size, a.resume_at, a.cells_tput, h100_cells_per_s(), a.quiet,
                              a.resume_tokenizer)
        done = True
    finally:
        if done and not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    k = [b["cpu_s"] / b["n_cells"] for b in builds]
    res = {
        "date": t0, "commit": commit, "dirty_tree": dirty,
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version(), "load_average_start": load0, "load_average_end": os.getloadavg(),
                 "note": "shared 2-core VM with other jobs running: wall times are inflated; compare CPU-seconds"},
        "generate": {kk: v for kk, v in gen.items() if kk != "files"},
        "build": builds,
        "build_linearity": {"cpu_us_per_cell": [round(x * 1e6, 1) for x in k],
                            "largest_over_smallest_cpu_per_cell": round(k[-1] / k[0], 3),
                            "largest_over_smallest_peak_rss": round(builds[-1]["peak_rss_mb"] / builds[0]["peak_rss_mb"], 3)},
        "loader": loader,
    }
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        plot(res, a.plot)
    print(json.dumps(res["build_linearity"] | {"resume_exact": loader["resume"]["exact"]}))
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        ap = argparse.ArgumentParser()
        for k in ("corpus", "ids-out", "stats-out"):
            ap.add_argument(f"--{k}", required=True)
        for k in ("context", "batch-size", "num-workers", "limit", "seed", "warmup"):
            ap.add_argument(f"--{k}", type=int, default=0)
        ap.add_argument("--state-in")
        ap.add_argument("--state-out")
        ap.add_argument("--quiet", action="store_true")
        ap.add_argument("--tokenizer", choices=("real", "ids"), default="real")
        rank_main(ap.parse_args(sys.argv[2:]))
    else:
        main()
