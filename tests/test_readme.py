"""The README stays true: its Python example runs, and every command line it shows names a real make target or a
real ``python -m`` entry point whose ``--help`` lists each option the README passes. (What the commands do is
tested where they live: the demo in tests/training/test_demo.py, build in tests/data_prep/test_build.py, etc.)"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                cmds.append(shlex.split(line))
    return cmds


def test_readme_opens_with_the_two_commands():
    first = _blocks("bash")[0]
    assert [c[:2] for c in _commands()[:2]] == [["make", "demo"], ["make", "test"]], first
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_readme_python_example_runs():
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("cmd", [c for c in _commands() if c[:2] == ["python", "-m"]], ids=lambda c: " ".join(c[2:4]))
def test_readme_command_options_exist(cmd):
    module, rest = cmd[2], cmd[3:]
    sub = [rest[0]] if module in ("launch", "data_prep", "training.reproduce") else []   # subcommands: launch status, …
    proc = subprocess.run([sys.executable, "-m", module, *sub, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for opt in (a.split("=")[0] for a in rest if a.startswith("--")):
        assert opt in proc.stdout, f"README passes {opt} to python -m {module}, which does not offer it"


def _own_data_commands() -> list[list[str]]:
    section = README.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _symbol_only_file(path: Path, rng) -> None:
    """A small file as users bring them: 600 real PBMC cells, gene symbols only (no Ensembl IDs), dense float
    counts of the 3,000 genes with most counts, a cell-type column and 4 donors (assigned at random)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from data_prep.datasets import pbmc3k_path

    full = ad.read_h5ad(pbmc3k_path())
    cells = np.sort(rng.choice(full.n_obs, 600, replace=False))
    x = full.X[cells]
    genes = np.sort(np.argsort(-np.asarray(x.sum(axis=0)).ravel())[:3000])
    obs = pd.DataFrame({"cell_type": full.obs["celltype"].iloc[cells].astype(str).to_numpy(),
                        "donor": rng.choice(["d1", "d2", "d3", "d4"], len(cells))},
                       index=full.obs_names[cells])
    ad.AnnData(X=np.asarray(x[:, genes].toarray(), dtype=np.float32), obs=obs,
               var=pd.DataFrame(index=full.var_names[genes])).write_h5ad(path)


@pytest.mark.slow
def test_readme_own_data_commands_run_on_a_symbol_only_file(tmp_path):
    import json
    import os

    import anndata as ad
    import numpy as np

    cmds = _own_data_commands()
    assert [c[2] for c in cmds] == ["data_prep", "training.train", "training.embed", "training.evaluate"]
    _symbol_only_file(tmp_path / "my_cells.h5ad", np.random.default_rng())
    assert "gene_ids" not in ad.read_h5ad(tmp_path / "my_cells.h5ad", backed="r").var
    fast = ["run.max_steps=3", "run.ckpt_every=3", "data.batch_size=8", "data.context_length=64",
            "optim.warmup_steps=1", "run.progress=false", "run.tensorboard=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "DS_BUILD_OPS": "0"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for cmd in cmds:
        args = [str(ROOT / a) if not (tmp_path / a).exists() and (ROOT / a).is_file() else a for a in cmd[3:]]
        if cmd[2] == "training.train":
            args += fast
        proc = subprocess.run([sys.executable, "-m", cmd[2], *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if cmd[2] == "data_prep":
            assert "(" in proc.stdout and "% of counts)" in proc.stdout
    manifest = json.loads((tmp_path / "runs/my_corpus/manifest.json").read_text())
    [rec] = manifest["datasets"]
    assert rec["gene_key"] == "symbols (var_names)" and "GENCODE" in manifest["symbol_table"]["source"]
    assert rec["count_share_mapped"] > 0.9 and rec["match_ratio"] > 0.5
    metrics = json.loads((tmp_path / "runs/my_model/eval/metrics.json").read_text())
    for m in (metrics, metrics["pca_baseline"]):
        assert m["n_cells"] == 600 and m["n_batches"] == 4
        for k in ("nmi", "ari", "asw_label", "asw_batch", "graph_connectivity", "overall"):
            assert 0 <= m[k] <= 1 or k == "ari"
        # iLISI needs scib's compiled kNN helper (glibc ≥ 2.38): where it cannot run, the reason is recorded.
        assert 0 <= m["ilisi"] <= 1 if "ilisi" in m else "ilisi" in m["not_computed"]
    assert metrics["pca_baseline"]["nmi"] > 0.5        # real PBMC structure is there
    if "ilisi" in metrics["pca_baseline"]:
        assert metrics["pca_baseline"]["ilisi"] > 0.5  # donors assigned at random mix well
    assert (tmp_path / "runs/my_model/eval/umap.png").is_file()
    # step 3's --pooling mean: the gene tokens' mean instead of the CLS state, same cells
    proc = subprocess.run([sys.executable, "-m", "training.embed", "runs/my_model", "my_cells.h5ad", "--out",
                           "runs/my_model/emb_mean.h5ad", "--pooling", "mean", "--no-progress"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls, mean = (ad.read_h5ad(tmp_path / "runs/my_model" / f) for f in ("emb.h5ad", "emb_mean.h5ad"))
    assert (cls.uns["sigattn_embed"]["pooling"], mean.uns["sigattn_embed"]["pooling"]) == ("cls", "mean")
    assert mean.obsm["X_sigattn"].shape == cls.obsm["X_sigattn"].shape
    assert not np.allclose(mean.obsm["X_sigattn"], cls.obsm["X_sigattn"])
