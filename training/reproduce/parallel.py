"""A recipe's arms trained side by side, one per GPU of this machine.

``on_gpus(fn, items, gpus)`` runs ``fn(*item)`` for every item and returns the results in the items' order. With
``gpus`` > 1 each call runs in one of ``gpus`` spawned worker processes; a worker is bound to one GPU
(``CUDA_VISIBLE_DEVICES``: the fresh training processes an arm starts inherit it), gets ⌊cores / gpus⌋ CPU threads,
and drops the launcher's rendezvous variables, so its process group picks a free port of its own. The arms are
independent runs (own seed, weights, cell order and folder), so side by side they differ from one after another only
in wall time: on a 2-GPU machine a device call trains twice the arms. Without CUDA the workers are plain CPU
processes (how the tests run it). An arm that raises does not stop the others: every arm runs, then the failures are
raised together, each named (as their own type when they share one, e.g. a ValueError for a refused budget).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from typing import Any, Callable, Sequence

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def visible_gpus() -> list[str]:
    """This process's GPUs as ``CUDA_VISIBLE_DEVICES`` entries ([] without CUDA)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def resolve_gpus(gpus: int | str) -> int:
    """``--gpus``: ``auto`` → every visible GPU (1 without CUDA); N ≥ 1, at most the visible GPUs where there are
    any (without CUDA: N CPU workers)."""
    n_visible = len(visible_gpus())
    if gpus == "auto":
        return max(1, n_visible)
    try:
        n = int(gpus)
    except (TypeError, ValueError):
        raise ValueError(f"--gpus {gpus!r}: give a number of GPUs or 'auto'") from None
    if n < 1:
        raise ValueError(f"--gpus {n}: at least 1")
    if n_visible and n > n_visible:
        raise ValueError(f"--gpus {n}: this machine shows {n_visible} GPU(s) (CUDA_VISIBLE_DEVICES)")
    return n


def _bind(slots, threads: int) -> None:
    """Worker initializer: take one GPU slot, share the cores, forget the parent's rendezvous."""
    slot = slots.get()
    for k in DIST_VARS:
        os.environ.pop(k, None)
    os.environ["CUDA_VISIBLE_DEVICES"] = slot
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def on_gpus(fn: Callable, items: Sequence[tuple], gpus: int, *, desc: str, names: Sequence[str] | None = None,
            progress: bool = True) -> list[Any]:
    """``[fn(*item) for item in items]``, ``gpus`` at a time on separate GPUs (``fn`` must be picklable: a
    module-level function or a ``functools.partial`` of one); ``names`` name the items in errors."""
    from tqdm.auto import tqdm

    items = list(items)
    if gpus <= 1 or len(items) <= 1:
        return [fn(*it) for it in tqdm(items, desc=desc, unit="arm", disable=not progress)]
    workers = min(gpus, len(items))
    ids = visible_gpus() or [""] * workers
    ctx = mp.get_context("spawn")
    results: list[Any] = [None] * len(items)
    errors: list[tuple[str, BaseException]] = []
    with ctx.Manager() as manager:
        slots = manager.Queue()
        for i in range(workers):
            slots.put(ids[i])
        threads = max(1, (os.cpu_count() or 1) // workers)
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_bind, initargs=(slots, threads)) as ex:
            futures = {ex.submit(fn, *it): i for i, it in enumerate(items)}
            for f in tqdm(cf.as_completed(futures), total=len(futures), desc=f"{desc} ({workers} at once)",
                          unit="arm", disable=not progress):
                i = futures[f]
                try:
                    results[i] = f.result()
                except Exception as e:   # every arm runs; the failures are raised together below
                    errors.append((names[i] if names else str(items[i]), e))
    if len(errors) == 1:
        raise errors[0][1]
    if errors:
        msg = f"{desc}: {len(errors)} of {len(items)} failed:\n" + "\n".join(f"{n}: {type(e).__name__}: {e}"
                                                                         for n, e in errors)
        kinds = {type(e) for _, e in errors}
        try:
            err = kinds.pop()(msg) if len(kinds) == 1 else RuntimeError(msg)
        except TypeError:                # an exception type that takes other arguments
            err = RuntimeError(msg)
        raise err
    return results
