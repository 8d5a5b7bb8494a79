"""Context-parallel training throughput: tokens/s, MFU, peak memory and the CP all-to-all share of step time.

Each run ``PRESET:CONTEXT:P[:C[:EXCHANGE]]`` is the real ``training.trainer.Trainer`` (DeepSpeed, the preset's ZeRO stage,
bf16 on GPU, activation checkpointing where the preset sets it) on all ``world_size`` ranks with
``parallel.context_parallel_degree = P`` (DP = world/P) and ``parallel.context_parallel_chunks = C`` (default 1:
one exchange; C > 1 pipelines it in C head chunks, ``training.parallel.ulysses_pipelined``) and
``parallel.context_parallel_exchange = EXCHANGE`` (auto: DeepSpeed's where it applies; ``ours`` at C = 1 times our
exchange against DeepSpeed's), on synthetic cells that fill the context (the
vocabulary is widened to ``2·context + 256`` genes where the nominal 60K cannot fill it: whole-transcriptome
or multi-cell contexts). Micro-batch: ``--batch-size`` cells per DP rank (default: the preset's tokens per
micro-batch, at least one cell). ``--settings plan`` takes ZeRO stage, activation checkpointing and micro-batch
from ``launch.memory.plan`` for the world, P and the card's memory instead of the preset (what ``launch.submit
--memory-plan`` would run; at long context with CP the preset's tokens per micro-batch leave most of the card
idle). After ``--warmup-steps``, ``--steps`` timed steps give the median tokens/s
and MFU (``(6·N_nonemb + 12·L·d·s)·tokens/s / (world · bf16 peak)``, attention FLOPs counted; see
``training.metrics``) and the peak ``torch.cuda.max_memory_allocated``; then ``--profile-steps`` steps under
``torch.profiler`` give the share of wall time spent in the context-parallel all-to-alls (device time of
NCCL ``SendRecv``/``AllToAll`` kernels on GPU — with C = 1 the exchange is synchronous on the compute stream, so
it is exposed time; with C > 1 the kernels run beside attention and their time is an upper bound of what is
exposed: compare ``step_s`` with the C = 1 row; CPU time of ``all_to_all`` ops on CPU/gloo).

    # on a 4-GPU machine (nvidia-h100-x4): launches one torchrun per run, so an OOM or hang loses one row
    python benchmarks/context_parallel.py --nproc 4 --out benchmarks/results/context_parallel_h100x4.json
    # or directly under torchrun (all runs in one process group)
    torchrun --nproc_per_node 4 benchmarks/context_parallel.py --runs 160m:32768:4 --out /tmp/cp.json

Rows carry ``world_size``, ``context_parallel_degree``, ``context_parallel_chunks``, ``data_parallel_degree``; the
JSON has the commit (``benchmarks.provenance``), device, host, versions and date; a markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_RUNS = ["160m:8192:1", "160m:16384:2", "160m:16384:4", "160m:32768:2", "160m:32768:4", "160m:32768:4:3",
                "160m:65536:2", "160m:65536:4", "1.4b:8192:1", "1.4b:8192:2", "1.4b:8192:4", "1.4b:8192:4:2",
                "1.4b:32768:2", "1.4b:32768:4", "1.4b:32768:4:2", "1.4b:32768:4:4"]
COMM_KERNEL = re.compile(r"SendRecv|AllToAll", re.IGNORECASE)     # NCCL kernels of all_to_all_single


class _Done(Exception):
    pass


def parse_run(spec: str) -> tuple[str, int, int, int, str]:
    """``PRESET:CONTEXT:P[:C[:EXCHANGE]]`` → (preset, context, P, C, exchange); C (head chunks of the pipelined
    exchange) defaults to 1, EXCHANGE (``parallel.context_parallel_exchange``: auto, deepspeed, ours) to auto."""
    from training.config import EXCHANGES

    parts = spec.split(":")
    ok = 3 <= len(parts) <= 5 and all(p.isdigit() for p in parts[1:4]) and (len(parts) < 5 or parts[4] in EXCHANGES)
    if not ok:
        raise ValueError(f"bad run {spec!r}: expected PRESET:CONTEXT:P[:C[:EXCHANGE]] with EXCHANGE one of "
                         f"{', '.join(EXCHANGES)}, e.g. 160m:32768:4, 1.4b:32768:4:2 or 1.4b:32768:4:1:ours")
    return (parts[0], int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) > 3 else 1,
            parts[4] if len(parts) > 4 else "auto")


def _comm_seconds(prof, cuda: bool) -> float:
    """Seconds of CP all-to-all in a profile: device time of the NCCL exchange kernels (GPU; the CPU-side ops
    that launch them are skipped, else their time would count twice), or gloo's all-to-all work (CPU)."""
    from torch.autograd import DeviceType
    total = 0.0
    for e in prof.key_averages():
        if cuda and e.device_type == DeviceType.CUDA and COMM_KERNEL.search(e.key):
            total += getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        elif not cuda and e.key == "gloo:all_to_all":
            total += e.cpu_time_total
    return total / 1e6


def _plan_overrides(m, context: int, P: int, batch_size: int | None) -> tuple[int, list[str]]:
    """``launch.memory.plan``'s micro-batch and (ZeRO stage, checkpointing) overrides for this world and card."""
    import torch

    from launch.memory import checkpointing_value, plan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    p = plan(m, context, world, mem, context_parallel=P)
    return batch_size or p.micro_batch, [f"run.zero_stage={p.zero_stage}",
                                         f"model.activation_checkpointing={checkpointing_value(p.activation_checkpointing)}"]


def run_one(size: str, context: int, P: int, attention: str, *, chunks: int = 1, exchange: str = "auto",
            batch_size: int | None, warmup: int,
            steps: int, profile_steps: int, overrides: list[str], settings: str = "preset") -> dict:
    """One run on the current process group; every rank returns the same row (rank 0's is kept)."""
    import torch
    import torch.distributed as dist

    from launch.configs import resolve_config
    from launch.model_size import model_size
    from training.config import load_config
    from training.presets import NOMINAL_VOCAB
    from training.trainer import Trainer

    m = model_size(size)
    if settings == "plan":
        bs, chosen = _plan_overrides(m, context, P, batch_size)
    else:
        bs, chosen = batch_size or max(1, m.batch_size * m.context // context), []
    vocab = max(NOMINAL_VOCAB, 2 * context + 256)
    cuda = torch.cuda.is_available()
    records: list[dict] = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                  + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
    marks: dict[str, float] = {}

    def collect(trainer, record):
        records.append(record)
        n = len(records)
        if n == warmup + steps:
            if cuda:
                torch.cuda.synchronize()
            prof.start()
            marks["t0"] = time.perf_counter()
        if n == warmup + steps + profile_steps:
            if cuda:
                torch.cuda.synchronize()
            marks["t1"] = time.perf_counter()
            prof.stop()
            raise _Done

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="sigattn-cp-bench-") as run_dir:
        cfg = load_config(resolve_config(size), [
            f"model.attention={attention}", "data.mds=null", f"data.context_length={context}",
            f"data.batch_size={bs}", f"data.synthetic_vocab={vocab}", f"data.synthetic_mean_genes={2 * context}",
            f"parallel.context_parallel_degree={P}", f"parallel.context_parallel_chunks={chunks}",
            f"parallel.context_parallel_exchange={exchange}", f"run.dir={run_dir}",
            f"run.max_steps={warmup + steps + profile_steps + 10}", "run.ckpt_every=0", "optim.warmup_steps=1",
            "run.progress=false", "run.tensorboard=false", "run.nan_policy=skip", *chosen, *overrides])
        error = None
        try:
            with Trainer(cfg, callbacks=[collect]) as trainer:
                world, n_nonemb = trainer.world, trainer.n_params_nonemb
                trainer.train()
        except _Done:
            pass
        except torch.OutOfMemoryError as e:
            error = f"out of memory: {str(e)[:200]}"
    row = {"size": size, "context": context, "attention": attention, "context_parallel_degree": P,
           "context_parallel_chunks": chunks, "exchange": resolved_exchange(exchange, chunks, cfg.model.n_heads, P),
           "batch_size": cfg.data.batch_size, "vocab": vocab, "settings": settings,
           "zero_stage": cfg.run.zero_stage, "activation_checkpointing": cfg.model.activation_checkpointing}
    if error or len(records) < warmup + steps:
        return row | {"error": error or f"only {len(records)} steps ran"}
    timed = [r for r in records[warmup:warmup + steps] if r.get("tokens_per_s")]
    prof_s = marks["t1"] - marks["t0"]
    comm = _comm_seconds(prof, cuda)
    mem = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else records[-1]["mem_gb"]],
                       device="cuda" if cuda else "cpu")
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return row | {
        "world_size": world, "data_parallel_degree": world // P, "n_params_nonemb": n_nonemb,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s"] for r in timed) / world,
        "cells_per_s": statistics.median(r["cells_per_s"] for r in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_gib": float(mem), "cp_comm_share": comm / (prof_s * 1.0) if prof_s > 0 else None,
        "cp_comm_s_per_step": comm / profile_steps, "step_s": prof_s / profile_steps,
        "loss_first": records[0].get("loss"), "loss_last": records[-1].get("loss"), "timed_steps": len(timed)}


def _meta() -> dict:
    import torch

    from benchmarks.provenance import commit
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()) if (REPO / ".git").exists() else None
    meta = {"commit": commit(), "dirty": dirty, "host": socket.gethostname(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import deepspeed
        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return meta


def resolved_exchange(exchange: str, chunks: int, n_heads: int, P: int) -> str:
    """The all-to-all a run used (:func:`training.parallel.ulysses.exchange_for`); "none" without CP."""
    from training.parallel.ulysses import exchange_for

    return "none" if P == 1 else exchange_for(n_heads, P, chunks, exchange)


def table(rows: list[dict]) -> str:
    lines = ["| preset | context | attention | world | CP | chunks (exchange) | DP | settings (ZeRO, ckpt) | cells/micro-batch | "
             "tokens/s | tokens/s/GPU | MFU | peak mem GiB | CP comm share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = f"{r['settings']} ({r['zero_stage']}, {r['activation_checkpointing']})" if "zero_stage" in r else ""
        head = f"| {r['size']} | {r['context']} | {r['attention']} | {r.get('world_size', '')} | " \
               f"{r['context_parallel_degree']} | {r.get('context_parallel_chunks', 1)}" \
               f"{' (' + r['exchange'] + ')' if r.get('exchange') else ''} | " \
               f"{r.get('data_parallel_degree', '')} | {settings} | {r['batch_size']} |"
        if "error" in r:
            lines.append(head + f" error: {r['error'][:60]} |||||")
            continue
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "–"
        share = f"{100 * r['cp_comm_share']:.1f}%" if r.get("cp_comm_share") is not None else "–"
        lines.append(head + f" {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {mfu} | "
                            f"{r['peak_mem_gib']:.1f} | {share} |")
    return "\n".join(lines)


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta | {"rows": rows}, indent=2))
    out.with_suffix(".md").write_text(f"Context-parallel training, {meta['device']} × {meta.get('world_size', '?')}, "
                                      f"commit {meta['commit']}, {meta['date']}\n\n{table(rows)}\n")


def worker(a) -> int:
    """Under torchrun: every run in this process group; rank 0 writes ``--out``."""
    from training.distributed import shutdown
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])   # the Trainer starts the process group
    meta = _meta() | {"world_size": world, "warmup_steps": a.warmup_steps, "timed_steps": a.steps,
                      "profile_steps": a.profile_steps, "overrides": a.override}
    rows = []
    try:
        for spec in a.runs:
            size, ctx, P, C, X = parse_run(spec)
            for att in a.attention:
                t0 = time.time()
                row = run_one(size, ctx, P, att, chunks=C, exchange=X, batch_size=a.batch_size, warmup=a.warmup_steps, steps=a.steps,
                              profile_steps=a.profile_steps, overrides=a.override, settings=a.settings)
                rows.append(row | {"seconds": round(time.time() - t0, 1)})
                if rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
                    _write(a.out, meta, rows)
    finally:
        shutdown()
    return 0


def launcher(a) -> int:
    """Outside torchrun: one ``torchrun --nproc_per_node N`` per run (a crash or hang costs one row)."""
    meta = None
    rows = []
    from tqdm.auto import tqdm

    from training.ports import free_port
    jobs = [(spec, att) for spec in a.runs for att in a.attention]
    for spec, att in tqdm(jobs, desc="context-parallel runs", unit="run"):
        parse_run(spec)
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "row.json"
            port = free_port()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_port",
                   str(port), __file__, "--runs", spec, "--attention", att, "--steps", str(a.steps),
                   "--warmup-steps", str(a.warmup_steps), "--profile-steps", str(a.profile_steps), "--out", str(part),
                   "--settings", a.settings, *(["--batch-size", str(a.batch_size)] if a.batch_size else []),
                   *[f"--override={o}" for o in a.override]]
            try:
                res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.run_timeout)
                ok = res.returncode == 0 and part.is_file()
                tail = (res.stdout + res.stderr)[-300:]
            except subprocess.TimeoutExpired:
                ok, tail = False, f"timed out after {a.run_timeout} s"
            if ok:
                got = json.loads(part.read_text())
                meta = meta or {k: v for k, v in got.items() if k != "rows"}
                rows += got["rows"]
            else:
                size, ctx, P, C, X = parse_run(spec)
                rows.append({"size": size, "context": ctx, "attention": att, "context_parallel_degree": P,
                             "context_parallel_chunks": C, "exchange": X,
                             "world_size": a.nproc, "batch_size": a.batch_size or "", "error": tail})
        _write(a.out, meta or (_meta() | {"world_size": a.nproc}), rows)
    print(table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="PRESET:CONTEXT:P[:C[:EXCHANGE]] (P = context-parallel degree, "
                    "C = head chunks of the pipelined exchange, default 1; EXCHANGE = auto | deepspeed | ours)")
    ap.add_argument("--attention", nargs="+", default=["sigmoid"], choices=["sigmoid", "softmax"])
    ap.add_argument("--nproc", type=int, default=4, help="ranks per run when launching torchrun (default 4)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=3, help="steps profiled for the CP communication share")
    ap.add_argument("--batch-size", type=int, default=None, help="cells per micro-batch per DP rank")
    ap.add_argument("--settings", choices=["preset", "plan"], default="preset",
                    help="ZeRO stage / checkpointing / micro-batch: the preset's, or launch.memory.plan's for this card")
    ap.add_argument("--override", action="append", default=[], help="extra trainer override (repeatable)")
    ap.add_argument("--run-timeout", type=int, default=900, help="seconds per torchrun launch")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        for spec in a.runs:
            parse_run(spec)
    except ValueError as e:
        ap.error(str(e))
    return worker(a) if "WORLD_SIZE" in os.environ else launcher(a)


if __name__ == "__main__":
    sys.exit(main())
