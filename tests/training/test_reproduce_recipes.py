"""``python -m training.reproduce stability|quality|speed`` end to end on tiny configs: every field of the
JSON summary is there and consistent with the per-arm logs, the plots and the report exist."""

import json
import math
import os
import shlex

import numpy as np
import pytest

from training.reproduce.__main__ import main

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(autouse=True)
def _restore_process_env():
    """The recipes run trainers in this process: they leave a one-process rendezvous (RANK, WORLD_SIZE, MASTER_PORT
    ...) in os.environ and a live process group, which later tests' subprocesses would inherit (EADDRINUSE)."""
    before = dict(os.environ)
    yield
    from training.distributed import shutdown
    shutdown()
    os.environ.clear()
    os.environ.update(before)


def _png(path):
    assert path.read_bytes()[:8] == PNG, path


@pytest.mark.slow
def test_stability_recipe_tiny(tmp_path, capsys):
    out = tmp_path / "stab"
    argv = ["stability", "--out", str(out), "--steps", "3", "--context", "16", "--batch-size", "2", "--warmup", "1",
            "--lrs", "1e-3", "--quiet"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["recipe"] == "stability" and s["settings"]["lrs"] == [1e-3] and s["settings"]["steps"] == 3
    assert {"commit", "device", "date", "host"} <= s["provenance"].keys()
    assert {(r["attention"], r["lr"]) for r in s["arms"]} == {("sigmoid", 1e-3), ("softmax", 1e-3)}
    for r in s["arms"]:
        for key in ("diverged", "diverged_reason", "first_nonfinite_step", "first_grad_spike_step",
                    "instability_step", "max_grad_norm", "max_attn_logit", "max_activation", "final_loss", "steps"):
            assert key in r, key
        logged = [json.loads(x) for x in (out / "arms" / r["arm"] / "stability.jsonl").read_text().splitlines()]
        assert [x["step"] for x in logged] == [1, 2, 3] and r["steps"] == 3
        assert r["max_grad_norm"] == pytest.approx(max(x["grad_norm"] for x in logged))
        assert all(math.isfinite(x["max_attn_logit"]) and x["max_activation"] > 0 for x in logged)
        metrics = [json.loads(x) for x in (out / "arms" / r["arm"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["loss"] for m in metrics] == [x["loss"] for x in logged]      # the trainer's own log agrees
    a, b = (next(r for r in s["arms"] if r["attention"] == k) for k in ("sigmoid", "softmax"))
    assert a["first_loss"] == pytest.approx(b["first_loss"], rel=0.05)           # same weights, data, masks
    _png(out / "stability.png")
    md = (out / "report.md").read_text()
    assert "| sigmoid | 0.001 |" in md and "](stability.png)" in md
    assert all(r["trained_on"]["device"] == s["provenance"]["device"] for r in s["arms"])   # where each arm ran
    assert f"Arms trained on {s['provenance']['device']}" in md
    before = (out / "arms" / "sigmoid_lr0.001" / "verdict.json").read_text()
    assert main(argv + ["--attention", "sigmoid"]) == 0                          # finished arms are reused
    assert (out / "arms" / "sigmoid_lr0.001" / "verdict.json").read_text() == before
    # another budget into the same folder is refused, naming what changed; the finished arm is kept
    assert main(argv + ["--attention", "sigmoid", "--min-lr-ratio", "1"]) == 2
    assert "min_lr_ratio 0.1 → 1.0" in capsys.readouterr().err
    assert (out / "arms" / "sigmoid_lr0.001" / "verdict.json").read_text() == before


def test_stability_over_several_seeds(tmp_path):
    out = tmp_path / "stab"
    argv = ["stability", "--out", str(out), "--steps", "3", "--context", "16", "--batch-size", "2", "--warmup", "1",
            "--lrs", "1e-3", "--seeds", "0", "5", "--attention", "sigmoid", "--min-lr-ratio", "1", "--quiet"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["seeds"] == [0, 5] and s["settings"]["min_lr_ratio"] == 1
    lrs = [json.loads(x)["lr"] for x in (out / "arms" / "sigmoid_lr0.001" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(1e-3)               # still the peak at the last step (the cosine ends at 1e-4)
    assert "warm-up 1, then constant" in (out / "report.md").read_text()
    assert {(r["arm"], r["seed"]) for r in s["arms"]} == {("sigmoid_lr0.001", 0), ("sigmoid_lr0.001_s5", 5)}
    a, b = ([json.loads(x) for x in (out / "arms" / n / "stability.jsonl").read_text().splitlines()]
            for n in ("sigmoid_lr0.001", "sigmoid_lr0.001_s5"))
    assert a[0]["loss"] != b[0]["loss"]                                       # another seed: other weights/cells
    md = (out / "report.md").read_text()
    assert "| sigmoid | 0.001 | 5 |" in md and "seed(s) 0, 5" in md and "runs (learning rate × seed)" in md
    _png(out / "stability.png")


def test_stability_cluster_scale_writes_a_valid_sweep(tmp_path):
    from launch.submit import parse_args, validate

    out = tmp_path / "cluster"
    assert main(["stability", "--scale", "cluster", "--out", str(out), "--nodes", "4", "--corpus", "/shared/corpus"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["steps"] == 80_000 and s["settings"]["context"] == 8192 and s["settings"]["preset"] == "160m"
    assert s["global_batch_cells"] == 8 * 32
    per_arm = {r["attention"]: r for r in s["projection"]}
    for att, r in per_arm.items():
        assert r["gpu_hours"] == pytest.approx(80_000 * 256 / r["cells_per_s_per_gpu"] / 3600)
    assert s["gpu_hours_total"] == pytest.approx(3 * sum(r["gpu_hours"] for r in per_arm.values()))
    cmd = (out / "submit_sweep.sh").read_text().strip().splitlines()[-1]
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "launch.submit"] and "optim.grad_clip=null" in argv
    assert "data.mds=/shared/corpus" in argv
    args = parse_args(argv[3:] + ["--nodes", "1", "--gpus-per-node", "0"])
    _, jobs = validate(args, use_slurm=False)                                  # the command is one launch accepts
    assert len(jobs) == 6 and all("optim.grad_clip=null" in j for j in jobs)
    _png(out / "projection" / "projection.png")


@pytest.mark.slow
def test_quality_recipe_tiny(tmp_path):
    out = tmp_path / "q"
    assert main(["quality", "--out", str(out), "--seeds", "0", "1", "--steps", "2", "--batch-size", "8",
                 "--context", "32", "--max-cells", "150", "--mask-patterns", "2", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["table"]) == {"pbmc3k", "kang2018"}
    for name, t in s["table"].items():
        for key in ("bio_conservation", "nmi", "ari", "asw_label", "bio_conservation_mean", "val_loss"):
            for arm in ("sigmoid", "softmax"):
                e = t[key][arm]
                assert e["n"] == 2 and e["ci_low"] <= e["mean"] <= e["ci_high"], (name, key, arm)
                assert set(e["per_seed"]) == {"0", "1"}
            d = t[key]["difference"]
            per = t[key]
            assert d["mean"] == pytest.approx(sum(per["sigmoid"]["per_seed"][k] - per["softmax"]["per_seed"][k]
                                                  for k in ("0", "1")) / 2)
        assert t["bio_conservation"]["PCA"]["n"] == 2 and "PCA" not in t["val_loss"]
        assert t["bio_conservation"]["untrained"]["n"] == 2 and t["val_loss"]["untrained"]["n"] == 2
        for key in ("bio_conservation", "bio_conservation_mean"):               # paired with the same seed's init
            per = t[key]
            assert t[key]["training_gain"]["mean"] == pytest.approx(sum(
                per["sigmoid"]["per_seed"][k] - per["untrained"]["per_seed"][k] for k in ("0", "1")) / 2)
        assert "PCA" not in t["bio_conservation_mean"]
    r = next(r for r in s["results"] if r["attention"] == "sigmoid" and r["seed"] == 1)
    assert 0 < r["metrics"]["kang2018"]["val_loss"] < 2 * math.log(51)
    assert r["metrics"]["pbmc3k"]["n_cells"] == len(__import__("anndata").read_h5ad(out / "heldout" / "pbmc3k.h5ad"))
    _png(out / "quality.png")
    run = out / "arms" / "untrained_seed0" / "run"                  # initial weights: one step, at lr 0
    assert [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0.0]
    md = (out / "report.md").read_text()
    assert "| untrained encoder |" in md and "| sigmoid − untrained (paired) |" in md
    assert "| bio-conservation, mean pooling |" in md and "What training added" in s["verdict"]
    a = __import__("anndata")
    cls, mean = (a.read_h5ad(out / "arms" / "sigmoid_seed1" / "embeddings" / f) for f in ("kang2018.h5ad",
                                                                                          "kang2018_mean.h5ad"))
    assert cls.uns["sigattn_embed"]["pooling"] == "cls" and mean.uns["sigattn_embed"]["pooling"] == "mean"
    assert not np.allclose(cls.obsm["X_sigattn"], mean.obsm["X_sigattn"])
    assert "## kang2018" in md and "| bio-conservation |" in md and "](quality.png)" in md


@pytest.mark.slow
def test_quality_recipe_in_stages(tmp_path, capsys, monkeypatch):
    # prepare (CPU) → device (training, val loss, embeddings; the datasets' package and scanpy need not be there)
    # → host (scIB, PCA, report): the lent GPUs hold neither the data package nor scanpy
    from training.reproduce import quality

    out = tmp_path / "q"
    tiny = ["--seeds", "0", "1", "--steps", "2", "--batch-size", "8", "--context", "32", "--max-cells", "150",
            "--mask-patterns", "1", "--datasets", "pbmc3k", "--quiet", "--out", str(out)]
    assert main(["quality", "--stage", "device", *tiny]) == 2                   # nothing prepared yet
    assert "--stage prepare" in capsys.readouterr().err
    assert main(["quality", "--stage", "prepare", *tiny]) == 0
    assert (out / "corpus" / "manifest.json").is_file() and (out / "heldout" / "pbmc3k.h5ad").is_file()
    assert main(["quality", "--stage", "host", *tiny]) == 2                     # not trained yet
    assert "--stage device" in capsys.readouterr().err
    real_val_loss = quality.val_loss                # one arm's values come out NaN (a kernel fault, bad weights)
    monkeypatch.setattr(quality, "val_loss", lambda run_dir, *a: {n: math.nan if "untrained_seed1" in str(run_dir)
                                                                   else v for n, v in real_val_loss(run_dir, *a).items()})
    with pytest.warns(UserWarning, match="arm untrained seed 1: non-finite: validation loss is not finite on pbmc3k"):
        assert main(["quality", "--stage", "device", *tiny]) == 0              # recorded; the call goes on
    assert "FAILED untrained_seed1: non-finite" in capsys.readouterr().out
    failed = out / "arms" / "untrained_seed1"
    assert (failed / "failed.json").is_file() and not (failed / "trained.json").exists()
    assert (out / "arms" / "untrained_seed0" / "trained.json").is_file()
    monkeypatch.setattr(quality, "val_loss", real_val_loss)
    t = json.loads((out / "arms" / "sigmoid_seed0" / "trained.json").read_text())
    assert t["val_loss"]["pbmc3k"] > 0 and (out / "arms" / "softmax_seed0" / "embeddings" / "pbmc3k.h5ad").is_file()
    assert not (out / "arms" / "sigmoid_seed0" / "result.json").exists() and not (out / "summary.json").exists()
    longer = [x if x != "2" or i != tiny.index("--steps") + 1 else "3" for i, x in enumerate(tiny)]
    assert main(["quality", "--stage", "device", *longer]) == 2                 # another budget: refused, arm kept
    assert "steps 2 → 3" in capsys.readouterr().err and t == json.loads(
        (out / "arms" / "sigmoid_seed0" / "trained.json").read_text())
    assert main(["quality", "--stage", "host", *longer]) == 2                   # nor scored as the other budget's
    assert "steps 2 → 3" in capsys.readouterr().err and not list(out.glob("arms/*/result.json"))
    for f in (out / "arms").glob("*/embeddings/*_mean.h5ad"):                 # as if trained before mean pooling
        f.unlink()
    for f in (out / "arms").glob("*/trained.json"):                             # as if trained on a GPU machine
        f.write_text(json.dumps((t := json.loads(f.read_text())) | {"provenance": t["provenance"] | {"device": "GPU X"}}))
    assert main(["quality", "--stage", "host", *tiny]) == 0
    md = (out / "report.md").read_text()
    assert "Trained on GPU X (commit `" in md and "; scored on device " in md  # both machines named
    assert "| bio-conservation |" in md and "mean pooling" not in md         # no row for what was not measured
    s = json.loads((out / "summary.json").read_text())
    r = next(r for r in s["results"] if r["attention"] == "softmax")
    assert r["metrics"]["pbmc3k"]["val_loss"] == json.loads(
        (out / "arms" / "softmax_seed0" / "trained.json").read_text())["val_loss"]["pbmc3k"]
    assert 0 <= r["metrics"]["pbmc3k"]["bio_conservation"] <= 1 and "PCA" in s["table"]["pbmc3k"]["bio_conservation"]
    # the failed arm is listed, not scored; the next device call trains it (and only it) again
    assert list(s["not_scored"]) == ["untrained_seed1"] and "- untrained_seed1: non-finite: validation loss" in md
    assert s["table"]["pbmc3k"]["bio_conservation"]["untrained"]["n"] == 1
    assert main(["quality", "--stage", "device", *tiny]) == 0
    assert (failed / "trained.json").is_file() and not (failed / "failed.json").exists()
    assert main(["quality", "--stage", "host", *tiny]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["not_scored"] == {} and s["table"]["pbmc3k"]["bio_conservation"]["untrained"]["n"] == 2
    assert "Not scored" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_speed_recipe_tiny(tmp_path):
    out = tmp_path / "speed"
    assert main(["speed", "--out", str(out), "--contexts", "32", "--warmup-steps", "1", "--timed-steps", "2",
                 "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    rows = {r["attention"]: r for r in s["throughput"]}
    assert set(rows) == {"sigmoid", "softmax"} and all("error" not in r for r in rows.values())
    assert rows["sigmoid"]["sigmoid_over_softmax"] == pytest.approx(
        rows["sigmoid"]["tokens_per_s"] / rows["softmax"]["tokens_per_s"])
    proj = s["projection"]
    assert {(r["size"], r["context"]) for r in proj} == {(z, c) for z in ("160m", "400m", "600m", "1.4b")
                                                         for c in (2048, 4096, 8192)}
    assert len(proj) == 24 and all(r["gpu_hours"] > 0 for r in proj)
    _png(out / "speed.png")
    _png(out / "projection" / "projection.png")
    assert "| 1.4b | 8192 |" in (out / "report.md").read_text()


def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys):
    assert main(["quality", "--out", str(tmp_path / "q"), "--seeds", "3", "1", "3", "--quiet"]) == 2
    assert "a seed is repeated" in capsys.readouterr().err
    assert main(["quality", "--out", str(tmp_path / "q"), "--datasets", "nope", "--quiet"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["stability", "--collect", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "no */stability.jsonl" in capsys.readouterr().err
