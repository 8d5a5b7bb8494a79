"""training.report on synthetic run directories (metrics.jsonl, config.yaml, eval/)."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from training.report import main, markdown_table, read_metrics, summarize, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(root, attention, rng, *, steps, with_eval=True, cell_types=("B", "NK", "T")):
    """A run directory as the trainer + evaluate would leave it, with random but known numbers."""
    d = root / f"run_{attention}"
    (d / "eval").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"attention": attention, "d_model": 64}}))
    loss = 7.0 * np.exp(-np.arange(steps) / (steps / 3)) + rng.uniform(0.5, 1.0) + 0.05 * rng.normal(size=steps)
    gn = rng.lognormal(size=steps)
    tok = rng.uniform(1e3, 2e3, size=steps)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(steps):
            f.write(json.dumps({"step": s + 1, "loss": loss[s], "grad_norm": gn[s], "lr": 1e-3,
                                "tokens_per_s": tok[s], "cells_per_s": tok[s] / 300}) + "\n")
            if s == steps // 2:
                f.write(json.dumps({"event": "checkpoint", "tag": "x"}) + "\n\n")
    if with_eval:
        m = {k: float(rng.uniform()) for k in ("nmi", "ari", "asw_label")}
        m["bio_conservation"] = float(np.mean(list(m.values())))
        (d / "eval" / "metrics.json").write_text(json.dumps(m))
        n = int(rng.integers(50, 90))
        pd.DataFrame({"umap1": rng.normal(size=n), "umap2": rng.normal(size=n),
                      "label": rng.choice(cell_types, n)}).to_csv(d / "eval" / "umap.csv")
    return d, loss, gn, tok


def test_report_tables_and_plots_match_the_runs(tmp_path):
    rng = np.random.default_rng()
    runs = {k: fake_run(tmp_path, k, rng, steps=int(rng.integers(23, 61))) for k in ("sigmoid", "softmax")}
    report = write_report([r[0] for r in runs.values()], tmp_path / "out", title="demo")
    assert list(report["runs"]) == ["sigmoid", "softmax"]
    for kind, (d, loss, gn, tok) in runs.items():
        s = report["runs"][kind]
        n_tail = int(np.ceil(0.1 * len(loss)))
        assert s["steps"] == len(loss)
        assert s["final_loss"] == pytest.approx(loss[-n_tail:].mean())
        assert s["max_grad_norm"] == pytest.approx(gn.max())
        assert s["tokens_per_s"] == pytest.approx(np.median(tok[1:]))
        ev = json.loads((d / "eval" / "metrics.json").read_text())
        assert s["bio_conservation"] == pytest.approx(ev["bio_conservation"])
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["runs"]["softmax"]["nmi"] == pytest.approx(report["runs"]["softmax"]["nmi"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# demo") and "| metric | sigmoid | softmax |" in md
    assert f"| NMI | {report['runs']['sigmoid']['nmi']:.3f} | {report['runs']['softmax']['nmi']:.3f} |" in md
    for png in ("training_curves.png", "umaps.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG
        assert f"]({png})" in md


def test_baselines_get_a_column_and_a_umap_panel(tmp_path):
    rng = np.random.default_rng()
    run = fake_run(tmp_path, "sigmoid", rng, steps=6)[0]
    base = fake_run(tmp_path, "pca", rng, steps=1)[0] / "eval"
    report = write_report([run], tmp_path / "out", baselines={"PCA": base})
    ev = json.loads((base / "metrics.json").read_text())
    assert report["baselines"]["PCA"]["ari"] == pytest.approx(ev["ari"])
    assert "| metric | sigmoid | PCA (baseline) |" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="baseline 'x'"):
        write_report([run], tmp_path / "out2", baselines={"x": tmp_path / "nowhere"})


def test_runs_without_eval_get_curves_only_and_dashes(tmp_path):
    rng = np.random.default_rng()
    a = fake_run(tmp_path, "sigmoid", rng, steps=5, with_eval=False)[0]
    b = fake_run(tmp_path, "softmax", rng, steps=3)[0]
    report = write_report([a, b], tmp_path / "out")
    assert "nmi" not in report["runs"]["sigmoid"] and "nmi" in report["runs"]["softmax"]
    assert "| NMI | – |" in markdown_table(report["runs"])
    assert (tmp_path / "out" / "training_curves.png").exists()


def test_resumed_run_keeps_last_record_per_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": float(v)}) + "\n" for s, v in [(1, 5), (2, 4), (2, 3.5), (3, 3)]))
    log = read_metrics(p)
    assert log["step"].tolist() == [1, 2, 3] and log["loss"].tolist() == [5, 3.5, 3]


def test_bad_runs_are_rejected_without_touching_an_existing_report(tmp_path, capsys):
    rng = np.random.default_rng()
    good = fake_run(tmp_path, "sigmoid", rng, steps=4)[0]
    assert main([str(good), "--out", str(tmp_path / "out")]) == 0
    before = (tmp_path / "out" / "report.json").read_text()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert main([str(good), str(broken), "--out", str(tmp_path / "out")]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no training log" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.json").read_text() == before
    (broken / "metrics.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(ValueError, match="no step records"):
        summarize(broken)
