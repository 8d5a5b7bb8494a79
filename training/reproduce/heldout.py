"""The held-out cells of a corpus: its val split, per dataset, as raw-count h5ad files for ``training.embed``.

``python -m training.reproduce.heldout CORPUS OUT``. The val split's ``cell_id``s (dataset offset + row of the
dataset's Zarr store, see ``data_prep.build``) are read from its MDS shards with mosaicml-streaming in a
child process (a second ``StreamingDataset`` in a process that trains or evaluates can wait forever on
streaming's shared-memory barrier), then the rows are cut from ``CORPUS/zarr/<dataset>.zarr``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from training.reproduce.datasets import LABEL_KEY


def _val_rows(corpus: Path, out: Path) -> None:
    from data_prep._torchvision_shim import ensure_importable

    ensure_importable()
    from streaming import StreamingDataset

    from data_prep.loader import streaming_shm_lock

    with streaming_shm_lock():
        ds = StreamingDataset(local=str(corpus / "mds" / "val"), shuffle=False, batch_size=1)
    rows = [[int(ds[i]["dataset"]), int(ds[i]["cell_id"])] for i in range(ds.num_samples)]
    (out / "val_cells.json").write_text(json.dumps(rows))


def heldout_cells(corpus: Path, out: Path, *, quiet: bool = True) -> dict[str, Path]:
    """``{dataset name: out/<name>.h5ad}`` of the val cells (labels in ``obs['cell_type']``); reused if present and
    cut from this very corpus (its manifest's fingerprint, kept in ``out/corpus_fingerprint``)."""
    import anndata as ad

    from training.demo import run_logged

    manifest = json.loads((corpus / "manifest.json").read_text())
    names = manifest["labels"]["dataset"]
    paths = {n: out / f"{n}.h5ad" for n in names}
    stamp = out / "corpus_fingerprint"
    if all(p.is_file() for p in paths.values()) and stamp.is_file() and stamp.read_text() == manifest["fingerprint"]:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    run_logged([sys.executable, "-m", "training.reproduce.heldout", str(corpus), str(out)], out / "heldout.log",
               "reading the val split", quiet)
    cells = np.asarray(json.loads((out / "val_cells.json").read_text()), dtype=np.int64).reshape(-1, 2)
    offsets = np.cumsum([0] + [d["cells_out"] for d in manifest["datasets"]])
    for d, name in enumerate(names):
        rows = np.sort(cells[cells[:, 0] == d, 1] - offsets[d])
        if len(rows) < 10:
            raise ValueError(f"dataset {name}: only {len(rows)} held-out cells; use more cells (--max-cells)")
        sub = ad.read_zarr(corpus / "zarr" / f"{name}.zarr")[rows]
        tmp = paths[name].with_suffix(".tmp.h5ad")
        # gzip: these files travel to GPU machines with a size limit (a third of the raw size)
        ad.AnnData(X=sub.X, obs=sub.obs[[LABEL_KEY]].astype(str), var=sub.var).write_h5ad(tmp, compression="gzip")
        tmp.replace(paths[name])
    stamp.write_text(manifest["fingerprint"])
    return paths


if __name__ == "__main__":
    _val_rows(Path(sys.argv[1]), Path(sys.argv[2]))
