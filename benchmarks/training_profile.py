"""Where a training step's time goes: torch.profiler over real trainer steps, per preset × context × attention.

Each run is the trainer ``launch.measure`` times (the preset's ZeRO stage, precision, checkpointing; synthetic cells
filling the context), in a fresh spawned process; after ``--warmup`` steps the profiler records ``--steps`` steps.
Device time (GPU kernels; on a CPU the ops' self time) is put into categories by kernel/op name:

    communication  NCCL/gloo collectives           attention  our sigmoid kernels, SDPA flash/cuDNN
    optimizer      Adam / multi-tensor kernels     loss       the masked-expression loss (cross-entropy, log-softmax)
    gemm           matmul kernels (projections, MLP, head)     copies  memcpy/memset
    other          norms, activations, residuals, casts, reductions...

and ``idle`` = step wall time − the union of busy intervals (host gaps, launch latency, syncs). Writes one JSON
(device, commit, date, per run: ms per step and share per category, the top kernels), a markdown table and a
stacked-bar plot:

    python benchmarks/training_profile.py --runs 160m:2048 160m:8192 1.4b:8192 --out benchmarks/results/profile_h100
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CATEGORIES = [  # first match wins
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all|c10d|gloo"),
    ("attention", r"attn|sigattn|flash|fmha|sdpa|scaled_dot_product|cudnn.*(attention|mha)|hopper_(fwd|bwd)"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer|lamb(?!da)"),  # not "lambda" (in elementwise kernels' names)
    ("loss", r"cross_entropy|nll_loss|log_softmax|mse_loss"),
    ("gemm", r"gemm|matmul|cutlass|xmma|nvjet|aten::mm$|aten::addmm|aten::bmm|aten::baddbmm|^sm90_|^sm80_|ampere_"),
    ("copies", r"memcpy|memset|aten::copy_"),
]
ORDER = [c for c, _ in CATEGORIES] + ["other", "idle"]


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def event_category(e) -> str:
    """The category of a profiler event: its own name's, or ``optimizer`` when it runs under the optimizer's step
    (e.g. the ``aten::sqrt``/``aten::div`` of a non-fused Adam on a CPU, whose names say nothing)."""
    cat = category(e.name)
    if cat in ("optimizer", "communication"):
        return cat
    parent = getattr(e, "cpu_parent", None)
    while parent is not None:
        if re.search(r"optimizer\.step|optimizer_step|\.step#", parent.name.lower()):
            return "optimizer"
        parent = getattr(parent, "cpu_parent", None)
    return cat


def _merged(intervals) -> list[list[float]]:
    """The union of ``(start, end)`` intervals as disjoint, sorted ``[start, end]`` pieces."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merged(intervals))


def alone_us(labelled: list[tuple[float, float, str]]) -> dict[str, float]:
    """Per category, the time when its kernels run and no other category's do (a sweep over interval ends): a
    category's kernels on a side stream under another's cost the step only this much, however long they look."""
    edges = sorted([(a, 1, c) for a, b, c in labelled] + [(b, -1, c) for a, b, c in labelled])
    active: dict[str, int] = {}
    out: dict[str, float] = {}
    last = None
    for t, step, c in edges:
        if last is not None and t > last:
            running = [k for k, n in active.items() if n > 0]
            if len(running) == 1:
                out[running[0]] = out.get(running[0], 0.0) + (t - last)
        active[c] = active.get(c, 0) + step
        last = t
    return out


PHASE = "trainer/"   # the trainer's record_function scopes (training/trainer.py): data, mask_copy, forward, ...


def _on_device(e) -> bool:
    """The event lies on the GPU timeline (a kernel, copy or annotation), not the host's."""
    return str(e.device_type).endswith("CUDA")


def _annotation(e) -> bool:
    """Not an op or kernel: the profiler's step ranges, memory records, record_function scopes (ours and any
    library's; each also shows on the GPU timeline as an annotation spanning its kernels) and with_stack's Python
    frames."""
    return (e.name.startswith("ProfilerStep") or e.name.startswith("[memory]") or e.name.startswith(PHASE)
            or bool(getattr(e, "is_user_annotation", False)) or getattr(e, "is_python_function", False))


def _kernels(events) -> list:
    """The device-side events that are work: kernels, copies, memsets (annotations left out)."""
    return [e for e in events if _on_device(e) and not _annotation(e)]


def idle_by_phase(events, n_steps: int) -> dict[str, float]:
    """GPU idle time per step (ms) by the trainer phase the host was in meanwhile: each stretch of a profiled step
    with no kernel running is split over the ``trainer/…`` scopes it overlaps (``outside``: none, e.g. the loop's
    own work and logging). Says what the GPU waits for: the next batch, DeepSpeed's optimizer step after its sync..."""
    steps = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.name.startswith("ProfilerStep") and not _on_device(e))
    merged = _merged((e.time_range.start, e.time_range.end) for e in _kernels(events))
    scopes = sorted((e.time_range.start, e.time_range.end, e.name[len(PHASE):]) for e in events
                    if e.name.startswith(PHASE) and not _on_device(e))
    idle = []
    for s0, s1 in steps:             # the complement of the busy union inside each step
        t = s0
        for a, b in merged:
            if b <= t or a >= s1:
                continue
            if a > t:
                idle.append((t, a))
            t = max(t, b)
        if t < s1:
            idle.append((t, s1))
    out: dict[str, float] = {}
    for a, b in idle:
        covered = 0.0
        for c0, c1, name in scopes:
            lo, hi = max(a, c0), min(b, c1)
            if hi > lo:
                out[name] = out.get(name, 0.0) + (hi - lo)
                covered += hi - lo
        out["outside"] = out.get("outside", 0.0) + max(0.0, (b - a) - covered)
    n = max(1, n_steps)
    return {k: v / n / 1e3 for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def host_by_phase(events, n_steps: int, top: int = 4) -> dict[str, dict]:
    """Host time per step (ms) in each ``trainer/…`` scope, with the ops directly under it that took most of it
    (inclusive times): what the host does while the GPU waits on that phase; and ``cuda``: the CUDA runtime calls
    anywhere under it (``cudaStreamSynchronize``, ``cudaHostAlloc``, ``cudaMemcpyAsync`` …), which say whether that
    time is a wait for the GPU, a page-locked allocation or a copy."""
    out: dict[str, dict] = {}
    for e in events:
        if not e.name.startswith(PHASE) or _on_device(e):
            continue
        d = out.setdefault(e.name[len(PHASE):], {"us": 0.0, "ops": {}, "cuda": {}})
        d["us"] += e.time_range.end - e.time_range.start
        for c in getattr(e, "cpu_children", None) or []:
            d["ops"][c.name] = d["ops"].get(c.name, 0.0) + (c.time_range.end - c.time_range.start)
        stack = list(getattr(e, "cpu_children", None) or [])
        while stack:
            c = stack.pop()
            if c.name.startswith("cuda") or c.name.startswith("cu"):      # runtime / driver API, not nested further
                d["cuda"][c.name] = d["cuda"].get(c.name, 0.0) + (c.time_range.end - c.time_range.start)
            else:
                stack += list(getattr(c, "cpu_children", None) or [])
    n = max(1, n_steps)
    ranked = lambda m: [{"name": k[:80], "ms_per_step": v / n / 1e3}  # noqa: E731
                        for k, v in sorted(m.items(), key=lambda kv: -kv[1])[:top]]
    return {name: {"ms_per_step": d["us"] / n / 1e3, "top": ranked(d["ops"]), "cuda": ranked(d["cuda"])}
            for name, d in sorted(out.items(), key=lambda kv: -kv[1]["us"])}


def breakdown(events, n_steps: int, on_gpu: bool) -> dict:
    """Per-category ms per step and share of the step wall time, from a profiler's event list."""
    steps = [e for e in events if e.name.startswith("ProfilerStep") and not _on_device(e)]
    wall_us = sum(e.time_range.end - e.time_range.start for e in steps)
    per_cat: dict[str, float] = {c: 0.0 for c in ORDER}
    top: dict[str, float] = {}
    busy = []
    labelled = []
    for e in events:
        if _annotation(e):
            continue
        if on_gpu:
            if _on_device(e):
                us = e.time_range.end - e.time_range.start
                busy.append((e.time_range.start, e.time_range.end))
                labelled.append((e.time_range.start, e.time_range.end, event_category(e)))
            else:
                continue
        else:
            us = e.self_cpu_time_total
            busy.append((0.0, us))           # one thread: self times do not overlap; summed below
        per_cat[event_category(e)] += us
        top[e.name] = top.get(e.name, 0.0) + us
    busy_us = _union_us(busy) if on_gpu else sum(b for _, b in busy)
    per_cat["idle"] = max(0.0, wall_us - busy_us)
    n = max(1, n_steps)
    alone = alone_us(labelled) if on_gpu else {}
    return {"step_ms": wall_us / n / 1e3, "busy_ms": busy_us / n / 1e3,
            **({"idle_by_phase_ms": idle_by_phase(events, n_steps)} if on_gpu else {}),
            "host_by_phase": host_by_phase(events, n_steps),
            "categories": {c: {"ms_per_step": v / n / 1e3, "share": v / wall_us if wall_us else None}
                           | ({"alone_ms_per_step": alone.get(c, 0.0) / n / 1e3} if on_gpu and c != "idle" else {})
                           for c, v in per_cat.items()},
            "top": [{"name": k[:120], "ms_per_step": v / n / 1e3, "category": category(k)}
                    for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]]}


def attention_kernels(events, n_steps: int, fwd_flops: float | None, calls_per_pass: int) -> dict:
    """The step's attention kernels by direction (name says ``fwd``/``bwd``), next to the kernel benchmarks.

    ``fwd_flops``: one forward pass's attention FLOPs per step, ``4·d·L·Σn²`` (Σn² = tokens per step × the
    effective cell length Σn²/Σn); a backward counts 2.5× that, the convention of ``benchmarks/attention.py``.
    ``calls_per_pass``: attention calls in one forward pass over the step (layers × micro-batches): launches per
    step over it gives the forward passes (2 where activation checkpointing recomputes the attention).
    """
    out = {}
    attention = [e for e in _kernels(events) if category(e.name) == "attention"]
    for direction, pat, flops_per_call in (("forward", r"fwd|forward|fprop", 1.0), ("backward", r"bwd|backward|bprop", 2.5)):
        ks = [e for e in attention if re.search(pat, e.name.lower())]
        if not ks:
            continue
        ms = sum(e.time_range.end - e.time_range.start for e in ks) / max(1, n_steps) / 1e3
        names = {}
        for e in ks:
            names[e.name[:60]] = names.get(e.name[:60], 0) + 1
        passes = max(1, round(max(names.values()) / max(1, n_steps) / max(1, calls_per_pass)))
        out[direction] = {"ms_per_step": ms, "passes": passes, "kernels": sorted(names),
                          "tflops": fwd_flops * flops_per_call * passes / (ms * 1e9) if fwd_flops and ms else None}
    return out


class _Stop(Exception):
    pass


def copy_sources(prof, n_steps: int, on_gpu: bool, top: int = 12) -> list[dict]:
    """Where copies come from: ``aten::copy_`` (what clone/contiguous/to end in) grouped by input shapes and Python
    stack (needs ``with_stack=True, record_shapes=True``), by device time per step (on a CPU: self CPU time)."""
    rows = []
    for avg in prof.key_averages(group_by_input_shape=True, group_by_stack_n=12):
        if avg.key != "aten::copy_":
            continue
        dev_us = avg.device_time_total if on_gpu else avg.self_cpu_time_total
        if not dev_us:
            continue
        stack = [re.sub(r" of \w+ object at 0x[0-9a-f]+", "", f) for f in (avg.stack or [])]
        frames = stack[:1] + [f for f in stack[1:] if "torch/" not in f and "site-packages" not in f]
        rows.append({"ms_per_step": dev_us / max(1, n_steps) / 1e3, "calls_per_step": avg.count / max(1, n_steps),
                     "shapes": str(avg.input_shapes)[:120], "stack": frames[:6]})
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:top]


def _profile_run(size: str, context: int, attention: str, bs: int, warmup: int, steps: int, extra: list[str],
                 trace: str | None, copies: bool = False) -> dict:
    """Child process: train ``warmup + steps`` steps, profile the last ``steps``; return the breakdown."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from launch.measure import own_rendezvous, trainer_config
    from training.trainer import Trainer

    own_rendezvous()
    on_gpu = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    seen = []
    with tempfile.TemporaryDirectory(prefix="sigattn-profile-") as run_dir:
        cfg = trainer_config(size, context, attention, bs, warmup + steps + 1, extra, run_dir)
        with profile(activities=acts, schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=steps, repeat=1),
                     record_shapes=copies, with_stack=copies,       # stacks need the verbose config
                     experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True) if copies else None
                     ) as prof:
            def step(trainer, record):
                seen.append(record)
                prof.step()
                if len(seen) >= warmup + steps:
                    raise _Stop

            try:
                with Trainer(cfg, callbacks=[step]) as trainer:
                    trainer.train()
            except _Stop:
                pass
        if trace:
            prof.export_chrome_trace(trace)
        out = breakdown(prof.events(), steps, on_gpu)
        if on_gpu:
            last = next((r for r in reversed(seen) if r.get("tokens_per_step")), None)
            fwd_flops = (4.0 * cfg.model.d_model * cfg.model.n_layers * last["tokens_per_step"] * last["seq_len"]
                         if last else None)
            out["attention_kernels"] = attention_kernels(prof.events(), steps, fwd_flops,
                                                         cfg.model.n_layers * cfg.optim.grad_accum)
        if copies:
            out["copy_sources"] = copy_sources(prof, steps, on_gpu)
    out["tokens_per_s"] = next((r["tokens_per_s"] for r in reversed(seen) if r.get("tokens_per_s")), None)
    out["mem_gb"] = max((r.get("mem_gb") or 0.0) for r in seen) if seen else None
    return out


def _table(rows: list[dict]) -> str:
    head = "| preset | context | attention | micro-batch | step ms | " + " | ".join(ORDER) + " |"
    lines = [head, "|" + "---|" * (5 + len(ORDER))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | – | error: {r['error'][:80]} |")
            continue
        cells = [f"{100 * r['categories'][c]['share']:.1f} %" if r["categories"][c]["share"] is not None else "–"
                 for c in ORDER]
        lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | {r['batch_size']} | {r['step_ms']:.1f} | "
                     + " | ".join(cells) + " |")
    phased = [r for r in rows if r.get("idle_by_phase_ms")]
    if phased:
        names = sorted({k for r in phased for k in r["idle_by_phase_ms"]},
                       key=lambda k: -max(r["idle_by_phase_ms"].get(k, 0.0) for r in phased))
        lines += ["", "GPU idle by the trainer phase the host was in (ms per step):", "",
                  "| preset | context | attention | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
        for r in phased:
            lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | "
                         + " | ".join(f"{r['idle_by_phase_ms'].get(k, 0.0):.1f}" for k in names) + " |")
    rated = [r for r in rows if r.get("attention_kernels")]
    if rated:
        lines += ["", "Attention kernels in the step (TFLOP/s on the step's Σn², backward 2.5× the forward's FLOPs; "
                  "compare with benchmarks/attention.py):", "",
                  "| preset | context | attention | forward ms | forward TFLOP/s | backward ms | backward TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in rated:
            cells = []
            for d in ("forward", "backward"):
                k = r["attention_kernels"].get(d)
                cells += ["–", "–"] if k is None else [f"{k['ms_per_step']:.1f}", "–" if k["tflops"] is None else
                                                      f"{k['tflops']:.0f}" + (f" ({k['passes']} passes)" if k["passes"] > 1 else "")]
            lines.append(f"| {r['size']} | {r['context']} | {r['attention']} | " + " | ".join(cells) + " |")
    hosted = [r for r in rows if r.get("host_by_phase")]
    if hosted:
        lines += ["", "Host time by trainer phase (ms per step) and the ops under it that took most:", ""]
        for r in hosted:
            lines.append(f"- {r['size']} @ {r['context']} {r['attention']}: " + "; ".join(
                f"{name} {d['ms_per_step']:.1f}"
                + (" (" + ", ".join(f"{o['name']} {o['ms_per_step']:.1f}" for o in d["top"]) + ")" if d["top"] else "")
                + (" [CUDA calls: " + ", ".join(f"{o['name']} {o['ms_per_step']:.1f}" for o in d.get("cuda", []))
                   + "]" if d.get("cuda") else "")
                for name, d in r["host_by_phase"].items()))
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(ok)), 4.2))
    labels = [f"{r['size']}@{r['context']}\n{r['attention']}" for r in ok]
    bottom = [0.0] * len(ok)
    colours = plt.get_cmap("tab10")
    for i, c in enumerate(ORDER):
        vals = [r["categories"][c]["ms_per_step"] for r in ok]
        ax.bar(labels, vals, bottom=bottom, label=c, color=colours(i) if c != "idle" else "lightgrey")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per training step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["160m:2048", "160m:8192", "1.4b:8192"], help="PRESET:CONTEXT")
    ap.add_argument("--attention", nargs="+", default=["sigmoid", "softmax"])
    ap.add_argument("--warmup", type=int, default=5, help="steps before the profiled ones")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: the preset's tokens)")
    ap.add_argument("--override", action="append", default=[], help="extra trainer override (repeatable)")
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace per run (large)")
    ap.add_argument("--copies", action="store_true",
                    help="also rank the sources of device copies (aten::copy_ by Python stack and shapes; slower)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    a = ap.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    import torch

    from benchmarks.provenance import commit
    from launch.model_size import model_size

    runs = []
    for spec in a.runs:
        size, _, ctx = spec.partition(":")
        if not ctx.isdigit():
            ap.error(f"bad --runs entry {spec!r}: expected PRESET:CONTEXT")
        runs += [(size, int(ctx), att) for att in a.attention]
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "commit": commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "warmup": a.warmup, "steps": a.steps, "overrides": a.override, "rows": []}
    from tqdm.auto import tqdm

    for size, ctx, att in tqdm(runs, desc="profile", unit="run"):
        m = model_size(size)
        bs = a.batch_size or max(1, m.batch_size * m.context // ctx)
        trace = str(a.out / f"trace_{size}_{ctx}_{att}.json") if a.trace else None
        row = {"size": size, "context": ctx, "attention": att, "batch_size": bs}
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row |= pool.submit(_profile_run, size, ctx, att, bs, a.warmup, a.steps, list(a.override),
                                   trace, a.copies).result()
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
        res["rows"].append(row)
        (a.out / "profile.json").write_text(json.dumps(res, indent=1))   # incremental
    table = _table(res["rows"])
    (a.out / "profile.md").write_text(f"{res['device']}, commit {res['commit']}, {res['date']}\n\n{table}\n")
    _plot(res["rows"], a.out / "profile.png", f"{res['device']}: time per training step by category")
    print(table)
    for r in res["rows"]:
        cats = r.get("categories", {})
        if "alone_ms_per_step" in cats.get("copies", {}):
            print(f"copies {r['size']}@{r['context']} {r['attention']}: {cats['copies']['ms_per_step']:.1f} ms/step, "
                  f"{cats['copies']['alone_ms_per_step']:.1f} with no other kernel running")
        for c in r.get("copy_sources", [])[:5]:
            print(f"copies {r['size']}@{r['context']} {r['attention']}: {c['ms_per_step']:.1f} ms/step "
                  f"{c['calls_per_step']:.0f} calls {c['shapes']} <- {' | '.join(c['stack'][:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
