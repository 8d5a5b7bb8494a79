"""training.reproduce.parallel: arms side by side in worker processes, one GPU each (CPU workers here)."""

import json
import os

import pytest

from training.reproduce.__main__ import main
from training.reproduce.parallel import on_gpus, resolve_gpus


def _probe(x, marker_dir):
    (marker_dir / f"ran_{x}").write_text(str(os.getpid()))
    if x in (1, 3):
        raise ValueError(f"item {x} is bad")
    return {"square": x * x, "pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": os.environ.get("OMP_NUM_THREADS"), "port": os.environ.get("MASTER_PORT")}


def _ok(x, marker_dir):
    return _probe(x + 10, marker_dir)


def test_items_run_in_workers_in_order_without_the_parents_rendezvous(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29999")            # a launcher's port: every worker must pick its own
    r = on_gpus(_ok, [(i, tmp_path) for i in range(5)], 2, desc="t", progress=False)
    assert [x["square"] for x in r] == [(i + 10) ** 2 for i in range(5)]
    pids = {x["pid"] for x in r}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(x["port"] is None and x["cuda"] == "" and int(x["threads"]) >= 1 for x in r)
    assert on_gpus(_ok, [(0, tmp_path)], 2, desc="t", progress=False)[0]["pid"] == os.getpid()  # one item: here


def test_every_item_runs_and_the_failures_are_raised_together_named(tmp_path):
    with pytest.raises(ValueError) as e:
        on_gpus(_probe, [(i, tmp_path) for i in range(5)], 2, desc="arms", names=[f"arm{i}" for i in range(5)],
                progress=False)
    assert "arms: 2 of 5 failed" in str(e.value) and "arm1: ValueError: item 1 is bad" in str(e.value)
    assert "arm3" in str(e.value) and sorted(p.name for p in tmp_path.iterdir()) == [f"ran_{i}" for i in range(5)]
    with pytest.raises(ValueError, match="item 3 is bad"):                     # one failure: itself
        on_gpus(_probe, [(0, tmp_path), (3, tmp_path)], 2, desc="arms", progress=False)


def test_gpus_option_is_checked():
    assert resolve_gpus("auto") == 1 and resolve_gpus("3") == 3              # no CUDA here: CPU workers
    for bad, msg in (("0", "at least 1"), ("two", "a number of GPUs or 'auto'")):
        with pytest.raises(ValueError, match=msg):
            resolve_gpus(bad)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quality_device_stage_side_by_side_matches_one_after_another(tmp_path):
    out = tmp_path / "q"
    tiny = ["--steps", "2", "--batch-size", "8", "--context", "32", "--max-cells", "150", "--mask-patterns", "1",
            "--datasets", "pbmc3k", "--quiet", "--out", str(out)]
    assert main(["quality", "--stage", "prepare", "--seeds", "0", *tiny]) == 0
    assert main(["quality", "--stage", "device", "--seeds", "0", "1", "--arms", "sigmoid", "untrained",
                 "--gpus", "2", *tiny]) == 0
    side = {a.name: json.loads((a / "trained.json").read_text()) for a in (out / "arms").iterdir()}
    assert sorted(side) == ["sigmoid_seed0", "sigmoid_seed1", "untrained_seed0", "untrained_seed1"]
    assert main(["quality", "--stage", "device", "--seeds", "1", "--arms", "sigmoid", "--force", "--gpus", "1",
                 *tiny]) == 0
    alone = json.loads((out / "arms" / "sigmoid_seed1" / "trained.json").read_text())
    assert alone["val_loss"]["pbmc3k"] == pytest.approx(side["sigmoid_seed1"]["val_loss"]["pbmc3k"], rel=1e-4)
    assert side["sigmoid_seed0"]["val_loss"] != side["sigmoid_seed1"]["val_loss"]     # the seeds did differ
