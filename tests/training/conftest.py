"""Fixtures shared by the trainer tests that train on real PBMC 3k shards (test_trainer, test_device_skip)."""

import pytest

from trainer_helpers import pbmc_corpus, restore_env, set_env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """PBMC 3k built once per module, with the trainer tests' environment set while it lives."""
    old = set_env()
    yield pbmc_corpus(tmp_path_factory)
    restore_env(old)


@pytest.fixture
def clean_streaming_shm():
    """StreamingDataset keeps shared memory per process; clear what a test leaves (``usefixtures`` per module)."""
    yield
    from data_prep._torchvision_shim import ensure_importable
    ensure_importable()
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()
