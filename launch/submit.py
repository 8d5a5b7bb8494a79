"""``python -m launch.submit CONFIG [key=value …] --nodes N --gpus-per-node G …``: submit training through submitit.

Slurm when ``sinfo`` reaches a controller (else, or with ``--local``, submitit's local executor). One task
per GPU (``--gpus-per-node 0``: ``--tasks-per-node`` CPU processes). Everything lives in one job folder:
``launch.json`` (what was submitted), ``submitit/`` (scripts, pickles, per-task logs), ``code/`` (a
snapshot of the repository the job runs from: git-tracked files plus untracked, non-ignored ones and
built ``*.so``), and ``runs/<tag>/`` (the trainer's ``run.dir``, one per sweep combination). Slurm sends
``USR2`` ``--signal-delay-s`` before the time limit; see ``launch.job`` for stop → save → requeue.
Everything is checked before anything is submitted: config/preset, overrides, sweep, and the node shape
(GPUs/CPUs per node and node count from ``sinfo``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from launch import cluster, configs, sweep
from launch.job import DEFAULT_ENTRY, TrainJob
from training.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def parse_time(s: str) -> int:
    """``HH:MM:SS``, ``MM:SS``, ``D-HH:MM:SS`` or minutes → minutes (rounded up)."""
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
    parts = [int(p) for p in s.split(":")]
    if len(parts) == 1:
        return days * 1440 + parts[0]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, sec = parts
    minutes = days * 1440 + h * 60 + m + (1 if sec else 0)
    if minutes <= 0:
        raise ValueError("time limit must be positive")
    return minutes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="preset name (training/configs/NAME.yaml) or path to a YAML config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU; 0 = CPU tasks")
    p.add_argument("--tasks-per-node", type=int, default=None, help="CPU processes per node when --gpus-per-node 0")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--context-parallel", type=int, default=None, metavar="P",
                   help="context-parallel degree: P ranks share each cell's sequence (parallel.context_parallel_degree; "
                        "must divide nodes x tasks per node and be at most the model's n_heads)")
    p.add_argument("--memory-plan", type=float, default=None, metavar="GPU_GIB",
                   help="set run.zero_stage, model.activation_checkpointing and data.batch_size by launch.memory.plan "
                        "for this many GiB per GPU and the job's GPU count (keys you override yourself are kept)")
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node (Slurm)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="01:00:00", help="time limit, HH:MM:SS (default 01:00:00)")
    p.add_argument("--signal-delay-s", type=int, default=120, help="USR2 this many seconds before the time limit")
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after a stop signal (default 3)")
    p.add_argument("--array-sweep", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="one array task per combination (cartesian product)")
    p.add_argument("--array-parallelism", type=int, default=8, help="array tasks running at once")
    p.add_argument("--name", default=None, help="job name (default: config name)")
    p.add_argument("--folder", default=None, help="job folder on shared storage (default: runs/launch/<time>_<name>)")
    p.add_argument("--local", action="store_true", help="run with submitit's local executor even if Slurm exists")
    p.add_argument("--no-snapshot", action="store_true", help="run from the working tree instead of a code snapshot")
    p.add_argument("--entry", default=DEFAULT_ENTRY, help=argparse.SUPPRESS)  # trainer factory module:function
    p.add_argument("--wait", action="store_true", help="block until all jobs end; exit 1 if one failed")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides may come before or after the options (but not right after ``--array-sweep``'s values)."""
    return build_parser().parse_intermixed_args(argv)


def memory_plan_overrides(cfg_path: Path, overrides: list[str], gpus: int, gpu_mem_gib: float,
                          log=print) -> list[str]:
    """``launch.memory.plan``'s ZeRO stage, checkpointing and micro-batch for the config (after ``overrides``) on
    ``gpus`` GPUs of ``gpu_mem_gib``, as overrides; a key the user already overrides is left to the user.
    Raises ``ValueError`` when nothing fits."""
    from launch.memory import checkpointing_value, checkpointing_words, plan
    from launch.model_size import model_size
    from training.config import load_config

    cfg = load_config(cfg_path, overrides)
    m = model_size(str(cfg_path), overrides=overrides)          # the overridden shape, counted on the meta device
    cp = cfg.parallel.context_parallel_degree
    p = plan(m, cfg.data.context_length, gpus, gpu_mem_gib, context_parallel=cp)
    chosen = {"run.zero_stage": str(p.zero_stage),
              "model.activation_checkpointing": checkpointing_value(p.activation_checkpointing),
              "data.batch_size": str(p.micro_batch)}
    mine = {o.partition("=")[0] for o in overrides}
    out = [f"{k}={v}" for k, v in chosen.items() if k not in mine]
    log(f"launch.submit: memory plan for {gpus} GPU(s) of {gpu_mem_gib:g} GiB at {cfg.data.context_length} tokens"
        f"{f' (context parallel {cp})' if cp > 1 else ''}: ZeRO-{p.zero_stage}, "
        f"{checkpointing_words(p.activation_checkpointing)} activation checkpointing, {p.micro_batch} cells per "
        f"micro-batch, {p.memory_gib:.1f} GiB per GPU modelled"
        + (f"; kept your {', '.join(sorted(mine & chosen.keys()))}" if mine & chosen.keys() else ""))
    return out


def validate(args: argparse.Namespace, use_slurm: bool) -> tuple[Path, list[list[str]]]:
    """Config path and one override list per job; ``SystemExit(2)`` with a clear message on any problem."""
    def fail(msg: str):
        raise SystemExit(f"launch.submit: error: {msg} (nothing submitted)")

    if args.nodes < 1:
        fail(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        fail(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    tasks = args.gpus_per_node or (args.tasks_per_node or 1)
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        fail("one task per GPU: leave --tasks-per-node unset or equal to --gpus-per-node")
    args.tasks_per_node = tasks
    if args.max_requeues < 0:
        fail("--max-requeues must be >= 0")
    try:
        args.timeout_min = parse_time(args.time)
    except ValueError:
        fail(f"--time {args.time!r}: expected HH:MM:SS")
    if args.signal_delay_s >= args.timeout_min * 60:
        fail(f"--signal-delay-s {args.signal_delay_s} is not shorter than --time {args.time}")
    if args.context_parallel is not None:
        world = args.nodes * tasks
        if args.context_parallel < 1 or world % args.context_parallel:
            fail(f"--context-parallel {args.context_parallel} must be >= 1 and divide the world size "
                 f"{world} (= --nodes {args.nodes} x {tasks} task(s) per node)")
        args.overrides = [*args.overrides, f"parallel.context_parallel_degree={args.context_parallel}"]
    entry_module = args.entry.partition(":")[0]
    try:
        cfg_path = configs.resolve_config(args.config)
        axes = sweep.parse_sweep(args.array_sweep)
        if args.memory_plan is not None:
            if not args.gpus_per_node:
                fail("--memory-plan sizes GPU memory: it needs --gpus-per-node >= 1")
            args.overrides = [*args.overrides, *memory_plan_overrides(cfg_path, args.overrides,
                                                                      args.nodes * args.gpus_per_node,
                                                                      args.memory_plan)]
        base = configs.check_overrides(cfg_path, args.overrides, entry_module)
        combos = [configs.check_overrides(cfg_path, base + c, entry_module)[len(base):] for c in sweep.expand(axes)]
    except (configs.ConfigError, ValueError) as e:
        fail(str(e))
    except ImportError as e:
        fail(f"trainer entry {args.entry!r} cannot be imported: {e}")
    if use_slurm:
        try:
            shape = cluster.node_shape(args.partition)
        except (ValueError, RuntimeError) as e:
            fail(str(e))
        if args.gpus_per_node > shape.gpus:
            fail(f"--gpus-per-node {args.gpus_per_node} but nodes of partition {shape.partition!r} have "
                 f"{shape.gpus} GPU(s)")
        if tasks * args.cpus_per_task > shape.cpus:
            fail(f"{tasks} task(s) x {args.cpus_per_task} CPU(s) per node but nodes of partition "
                 f"{shape.partition!r} have {shape.cpus} CPUs")
        if args.nodes > shape.nodes:
            fail(f"--nodes {args.nodes} but partition {shape.partition!r} has {shape.nodes} node(s)")
    else:
        import torch

        if args.nodes > 1:
            fail(f"--nodes {args.nodes} needs Slurm; the local executor runs on this machine only")
        if args.gpus_per_node > torch.cuda.device_count():
            fail(f"--gpus-per-node {args.gpus_per_node} but this machine has {torch.cuda.device_count()} GPU(s)")
    return cfg_path, [base + c for c in combos]


def _snapshot(folder: Path):
    """submitit's ``RsyncSnapshot`` of tracked files + untracked non-ignored files + built extensions."""
    import submitit

    def git(*a: str) -> list[str]:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")

    extra = [f for f in git("ls-files", "--others", "--exclude-standard") if f]
    extra += [f for f in git("ls-files", "--others", "--ignored", "--exclude-standard", "--", "*.so") if f
              and not f.startswith(".venv/")]
    return submitit.helpers.RsyncSnapshot(folder / "code", root_dir=REPO, include=extra)


def submit(args: argparse.Namespace) -> tuple[Path, list]:
    import submitit

    use_slurm = not args.local and cluster.slurm_available()
    cfg_path, jobs_overrides = validate(args, use_slurm)
    name = args.name or cfg_path.stem
    folder = Path(args.folder or REPO / "runs" / "launch" / f"{time.strftime('%Y%m%d-%H%M%S')}_{name}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tags = [sweep.tag(o[len(args.overrides):]) for o in jobs_overrides]
    run_dirs = [folder / "runs" / t for t in tags]
    executor = submitit.AutoExecutor(folder=folder / "submitit" / "%j", cluster=None if use_slurm else "local")
    params = dict(name=name, nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.timeout_min, slurm_signal_delay_s=args.signal_delay_s)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if use_slurm:
        params.update(slurm_array_parallelism=args.array_parallelism, slurm_additional_parameters={"requeue": True})
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
        if args.mem_gb:
            params["mem_gb"] = args.mem_gb
    executor.update_parameters(**params)
    # Local jobs get a port free now, below the ephemeral range (training.ports); submitit's own pick (random, seeded
    # by the job id = the controller's PID) can land on a port in use and fail the rendezvous with EADDRINUSE.
    bodies = [TrainJob(config=str(cfg_path), overrides=o + [f"run.dir={d}"], entry=args.entry,
                       max_requeues=args.max_requeues, master_port=None if use_slurm else free_port(""))
              for o, d in zip(jobs_overrides, run_dirs)]
    snap = nullcontext() if args.no_snapshot else _snapshot(folder)
    cwd = os.getcwd()
    try:
        with snap:
            if args.no_snapshot:
                os.chdir(REPO)  # jobs import the packages from the repository root
            with executor.batch() if len(bodies) > 1 else nullcontext():
                jobs = [executor.submit(b) for b in bodies]
    finally:
        os.chdir(cwd)
    record = {"name": name, "cluster": executor.cluster, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "argv": sys.argv, "config": str(cfg_path), "nodes": args.nodes, "tasks_per_node": args.tasks_per_node,
              "gpus_per_node": args.gpus_per_node,
              "jobs": [{"job_id": j.job_id, "overrides": b.overrides, "run_dir": str(d), "tag": t}
                       for j, b, d, t in zip(jobs, bodies, run_dirs, tags)]}
    (folder / "launch.json").write_text(json.dumps(record, indent=2))
    return folder, jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder, jobs = submit(args)
    where = "Slurm" if jobs and type(jobs[0]).__name__.startswith("Slurm") else "this machine (local executor)"
    print(f"submitted {len(jobs)} job(s) to {where}: {', '.join(j.job_id for j in jobs)}")
    print(f"job folder: {folder}")
    print(f"  python -m launch status {folder}\n  python -m launch tail {folder}\n  python -m launch cancel {folder}")
    if where == "Slurm":
        print(f"  squeue -j {jobs[0].job_id.split('_')[0]}    sacct -j {jobs[0].job_id.split('_')[0]}")
    if not args.wait:
        return 0
    failed = 0
    for j in jobs:
        try:
            print(f"{j.job_id}: {j.results()[0]}")  # rank 0's return value
        except Exception as e:  # noqa: BLE001 - report every job, then exit non-zero
            failed += 1
            print(f"{j.job_id}: FAILED: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
