"""Fixtures: the real PBMC 3k corpus (built once per session) and small synthetic h5ad files."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.build import BuildOptions, build
from data_prep.datasets import pbmc3k_path


@pytest.fixture(scope="session")
def pbmc_path() -> str:
    return pbmc3k_path()


@pytest.fixture(scope="session")
def pbmc_corpus(tmp_path_factory, pbmc_path):
    """PBMC 3k built with the documented demo options; returns (dir, manifest)."""
    out = tmp_path_factory.mktemp("corpus") / "pbmc"
    m = build([pbmc_path], str(out), BuildOptions(cell_type_key="celltype", min_genes=200, val_frac=0.1,
                                                  test_frac=0.1, seed=3), log=lambda *a: None)
    return str(out), m


@pytest.fixture
def rng(request):
    """Fresh randomness per test (seed printed on failure via the test id)."""
    seed = np.random.SeedSequence().entropy % (2**32)
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _clean_streaming_shm():
    """StreamingDataset keeps shared memory per local dir; clear stale blocks between tests."""
    yield
    from data_prep._torchvision_shim import ensure_importable
    ensure_importable()
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()
