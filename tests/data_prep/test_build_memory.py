"""The build's memory does not grow with the corpus: one input file's cells in memory at a time, and no
array with an entry per corpus cell (labels and split codes live on disk per dataset until MDS)."""

import gc
import warnings
import weakref

import anndata as ad
import numpy as np
import pandas as pd
from h5ad_factory import synth_counts, write_h5ad

import data_prep.mds
from data_prep.build import BuildOptions, build
from data_prep.source import Source
from data_prep.split import GroupSplitWarning


def _file(path, rng, n):
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["T", "B", "NK", "mono"], n)),
                        "donor_id": pd.Categorical(rng.choice([f"d{i}" for i in range(6)], n))},
                       index=[f"c{i}" for i in range(n)])
    return write_h5ad(path, synth_counts(rng, n, 40), obs=obs)


def test_build_holds_one_file_of_cells_and_no_per_cell_array(tmp_path, rng, monkeypatch):
    files = [_file(tmp_path / f"f{i}.h5ad", rng, int(rng.integers(150, 400))) for i in range(5)]
    with_obs, most = weakref.WeakSet(), [0]
    init = Source.__init__

    def counting_init(self, *a, **kw):  # Sources with their obs loaded, alive at the same time
        init(self, *a, **kw)
        if self.obs is not None:
            gc.collect()
            with_obs.add(self)
            most[0] = max(most[0], len(with_obs))

    write_mds, task_arrays = data_prep.mds.write_mds, []

    def spy(tasks, *a, **kw):  # what the build holds for the MDS stage
        task_arrays.extend(x.nbytes for t in tasks for x in (t.split, t.cell_type, t.donor) if x is not None)
        assert all(t.labels is not None for t in tasks)
        return write_mds(tasks, *a, **kw)

    monkeypatch.setattr(Source, "__init__", counting_init)
    monkeypatch.setattr(data_prep.mds, "write_mds", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupSplitWarning)
        m = build(files, str(tmp_path / "c"), BuildOptions(min_genes=1, cells_per_part=97), log=lambda *a: None)
    assert most[0] == 1, f"{most[0]} files' obs in memory at once"
    assert task_arrays == [], "MDS tasks carry per-cell arrays"
    assert m["totals"]["cells_in_mds"] == sum(m["split"]["n_cells"].values()) > 0
    assert not (tmp_path / "c" / ".labels").exists()  # scratch removed
    # the labels read back from disk are the files' own
    from streaming import StreamingDataset  # after data_prep.mds (its torchvision shim)
    got = {}
    for split in ("train", "val", "test"):
        ds = StreamingDataset(local=str(tmp_path / "c" / "mds" / split), shuffle=False, batch_size=1)
        for i in range(ds.num_samples):
            s = ds[i]
            got[int(s["cell_id"])] = (m["labels"]["cell_type"][s["cell_type"]], m["labels"]["donor"][s["donor"]])
    want, offset = {}, 0
    for d, f in enumerate(files):
        o = ad.read_h5ad(f).obs
        for i, (ct, donor) in enumerate(zip(o["cell_type"].astype(str), o["donor_id"].astype(str))):
            want[offset + i] = (ct, f"{m['datasets'][d]['name']}/{donor}")
        offset += len(o)
    assert got == want and np.all(np.diff(sorted(got)) == 1)
