"""Stream MDS cell shards to training: ``StreamingDataset`` + load-time tokenisation + packed batches.

Each rank builds its own loader; mosaicml-streaming reads ``RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``
from the torch.distributed environment and gives every rank a disjoint slice of the global
``py1e``-shuffled order. ``num_canonical_nodes`` is pinned (default 1) so the sample order does not
depend on the number of physical nodes, and ``StreamingDataLoader.state_dict()`` /
``load_state_dict()`` resume mid-epoch with neither overlap nor gap. The gene-sampling epoch passed
to the tokenizer is the dataset's epoch, so resumed runs see the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from data_prep._torchvision_shim import ensure_importable

ensure_importable()

from streaming import StreamingDataLoader, StreamingDataset  # noqa: E402

# mosaicml-streaming 0.13 reads each compressed shard with ``open(path, 'rb').read()`` and never closes the file
# (streaming/base/stream.py, ``_decompress_shard_part``): a ResourceWarning per shard wherever they are shown.
# The file is ours to read only through streaming, so the warning is silenced for that module alone.
warnings.filterwarnings("ignore", category=ResourceWarning, module=r"streaming\.base\.stream")
from streaming.base.dataset import _ShardState  # noqa: E402

from data_prep.tokenize import CellTokenizer, pack_batch  # noqa: E402

SPLITS = ("train", "val", "test")
SHM_LOCK = os.path.join(tempfile.gettempdir(), "sigattn_streaming_shm.lock")


@contextlib.contextmanager
def streaming_shm_lock(timeout_s: float = 600.0) -> Iterator[None]:
    """Hold a machine-wide file lock while a ``StreamingDataset`` registers its shared memory.

    streaming picks the first free ``/dev/shm`` prefix, then creates it; two independent processes
    that build a dataset at the same moment (arms trained side by side, one evaluating while another
    starts) pick the same prefix and one dies with ``FileExistsError``. Only a rank's local leader takes
    the lock: within one job streaming already orders the other ranks behind their leader with barriers.
    """
    from filelock import FileLock, Timeout
    from streaming.base.world import World

    if not World.detect().is_local_leader:
        yield
        return
    lock = FileLock(SHM_LOCK, timeout=timeout_s, mode=0o666)
    try:
        try:
            lock.acquire()
        except PermissionError:   # another user's lock file we may not open: serialise this user's processes
            lock = FileLock(f"{SHM_LOCK}.{os.getuid()}", timeout=timeout_s)
            lock.acquire()
    except Timeout:
        raise RuntimeError(f"waited {timeout_s:.0f} s for {lock.lock_file}, held by another process building a "
                           "StreamingDataset; is one hung?") from None
    try:
        yield
    finally:
        lock.release()


class TokenizedCellDataset(StreamingDataset):
    """``StreamingDataset`` whose samples are tokenised cells (dicts from ``CellTokenizer`` + labels)."""

    def __init__(self, *, tokenizer: CellTokenizer, **kwargs: Any):
        with streaming_shm_lock():
            super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self._epoch = 0
        self._local_shards: set[int] = set()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Skip streaming's per-sample shard check once a shard is local and nothing can evict it.

        streaming's download thread calls this for every sample: a ``FileLock`` round trip and a
        stat of the shard file (~100–150 µs of Python that holds the GIL beside tokenisation, which
        made the loader ~3× slower than its parts). Without a ``cache_limit`` no shard is ever
        evicted, so a shard seen LOCAL once in this process stays ready; with one, every call goes
        to streaming (it also records access times for eviction).
        """
        if self.cache_limit is None and shard_id in self._local_shards:
            return
        super().prepare_shard(shard_id, blocking)
        if self._shard_states[shard_id] == _ShardState.LOCAL:
            self._local_shards.add(shard_id)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch  # runs in every worker at the start of its epoch
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        s = super().get_item(sample_id, retry)
        out = self.tokenizer(s["genes"], s["counts"], cell_id=int(s["cell_id"]), epoch=self._epoch)
        for key in ("cell_type", "dataset", "donor", "cell_id"):
            out[key] = int(s[key])
        return out


class CellLoader(StreamingDataLoader):
    """``StreamingDataLoader`` that counts cells (not tokens) per packed batch, so resume is exact."""

    def _get_batch_size(self, batch: Any) -> int:
        return len(batch["cu_seqlens"]) - 1

    def state_dict(self) -> dict[str, Any] | None:
        """streaming's state, with a finished epoch written as the start of the next one.

        Right after an epoch's last batch streaming reports ``sample_in_epoch ≥ epoch_size`` of the
        current epoch; loading that replays the finished epoch from its end and yields nothing. An
        uninterrupted run would start the next epoch at sample 0 (same seed, next epoch's shuffle
        and gene sampling), so that is the state saved: ``{epoch + 1, sample_in_epoch 0}``.
        """
        state = super().state_dict()
        if state is not None and state["sample_in_epoch"] >= self.dataset.epoch_size:
            state = {**state, "epoch": state["epoch"] + 1, "sample_in_epoch": 0}
        return state


def resolve_split_dir(mds: str, split: str) -> str:
    """``mds`` may be the corpus dir (holding ``mds/``) or the MDS root itself; returns ``…/mds/<split>``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    mds = os.fspath(mds)
    if "://" not in mds and os.path.isdir(os.path.join(mds, "mds")) and not os.path.isdir(os.path.join(mds, split)):
        mds = os.path.join(mds, "mds")
    return mds.rstrip("/") + "/" + split


def build_loader(mds: str, split: str, *, tokenizer: CellTokenizer, batch_size: int, local: str | None = None,
                 shuffle: bool = True, seed: int = 0, num_workers: int = 0, num_canonical_nodes: int = 1,
                 shuffle_block_size: int | None = None, drop_last: bool = False, predownload: int | None = None,
                 cache_limit: str | int | None = None, persistent_workers: bool | None = None,
                 pin_memory: bool = False, **dataset_kwargs: Any) -> CellLoader:
    """A resumable ``StreamingDataLoader`` of packed varlen batches (see ``pack_batch``) for this rank.

    ``mds``: corpus dir, MDS root, or a remote URL/path of the MDS root. With ``local=None`` the
    shards are read in place; otherwise ``mds`` is the remote and ``local`` the cache root (each split
    gets ``local/<split>``). ``batch_size`` is cells per rank per step. ``pin_memory`` (CUDA only) hands out
    batches in page-locked memory, so the trainer's ``non_blocking`` copies to the GPU are truly asynchronous.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    remote_split = resolve_split_dir(mds, split)
    if local is None:
        if "://" in remote_split:
            raise ValueError(f"a remote MDS path ({remote_split}) needs a local cache dir: pass local=")
        if not os.path.isfile(os.path.join(remote_split, "index.json")):
            raise FileNotFoundError(f"no MDS index at {remote_split}/index.json (was the corpus built?)")
        with open(os.path.join(remote_split, "index.json")) as f:
            n = sum(shard.get("samples", 0) for shard in json.load(f).get("shards", []))
        if n == 0:   # streaming's own error ("Stream contains no samples") names neither the split nor why
            raise ValueError(f"the {split} split at {remote_split} holds no cells: the corpus had too few cells (or "
                             f"donors) for its val/test fractions; build it from more cells, or use another split")
        kw = {"local": remote_split}
    else:
        kw = {"remote": remote_split, "local": os.path.join(os.fspath(local), split)}
    dataset = TokenizedCellDataset(
        tokenizer=tokenizer, shuffle=shuffle, shuffle_seed=seed, shuffle_algo="py1e",
        num_canonical_nodes=num_canonical_nodes, shuffle_block_size=shuffle_block_size,
        batch_size=batch_size, predownload=predownload, cache_limit=cache_limit, **kw, **dataset_kwargs)
    return CellLoader(
        dataset, batch_size=batch_size, collate_fn=pack_batch, num_workers=num_workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=bool(num_workers) if persistent_workers is None else persistent_workers)
