import gc
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data_prep._torchvision_shim import ensure_importable
from data_prep.loader import build_loader
from data_prep.tokenize import CellTokenizer
from data_prep.vocab import GeneVocab

ensure_importable()
from streaming import StreamingDataset  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402


def _tok(corpus, L=256, seed=0):
    return CellTokenizer(len(GeneVocab.load(os.path.join(corpus, "vocab.tsv"))), L, 21, seed)


def _ids(loader, limit=None):
    out = [b["cell_id"] for b in itertools.islice(loader, limit)]  # islice: never fetches batch limit+1
    return torch.cat(out).tolist() if out else []


def _release(*objs):
    del objs
    gc.collect()
    clean_stale_shared_memory()


def test_local_batches_are_packed_and_cover_split(pbmc_corpus):
    corpus, m = pbmc_corpus
    tok = _tok(corpus)
    dl = build_loader(corpus, "val", tokenizer=tok, batch_size=17, seed=1)
    ids, n_tokens = [], 0
    for b in dl:
        B = len(b["cell_id"])
        assert b["cu_seqlens"].shape == (B + 1,) and b["cu_seqlens"].dtype == torch.int32
        assert b["input_ids"].shape == b["values"].shape == (int(b["cu_seqlens"][-1]),)
        assert (b["input_ids"][b["cu_seqlens"][:-1].long()] == 1).all()  # CLS first
        assert b["max_seqlen"] == int(torch.diff(b["cu_seqlens"]).max()) <= 256
        assert b["input_ids"].max() < tok.n_tokens and b["values"].max() < tok.n_value_tokens
        assert b["cell_type"].max() < len(m["labels"]["cell_type"])
        ids += b["cell_id"].tolist()
        n_tokens += len(b["input_ids"])
    assert len(ids) == len(set(ids)) == m["split"]["n_cells"]["val"]
    assert n_tokens > 2 * len(ids)
    _release(dl)


def test_sample_matches_zarr_corpus(pbmc_corpus):
    """An MDS sample is the zarr row of its cell_id restricted to mapped genes."""
    import anndata as ad
    corpus, m = pbmc_corpus
    ds = StreamingDataset(local=os.path.join(corpus, "mds", "test"), shuffle=False, batch_size=1)
    a = ad.read_zarr(os.path.join(corpus, m["datasets"][0]["zarr"]))
    vid = a.var["vocab_id"].to_numpy()
    for k in np.random.default_rng().choice(len(ds), 5, replace=False):
        s = ds[int(k)]
        row = a.X[int(s["cell_id"])]
        mapped = vid[row.indices] >= 0
        assert np.array_equal(np.sort(s["genes"]), np.sort(vid[row.indices][mapped]))
        order = np.argsort(vid[row.indices][mapped])
        assert np.array_equal(s["counts"][np.argsort(s["genes"])], row.data[mapped][order])
    _release(ds)


def test_remote_with_local_cache(pbmc_corpus, tmp_path):
    corpus, m = pbmc_corpus
    remote = os.path.join(corpus, "mds")
    cache = tmp_path / "cache"
    dl = build_loader(remote, "test", tokenizer=_tok(corpus), batch_size=32, local=str(cache), shuffle=False)
    ids = _ids(dl)
    assert sorted(ids) == ids and len(ids) == m["split"]["n_cells"]["test"]
    assert list((cache / "test").glob("part-*/shard.*.mds"))  # shards were fetched into the cache
    _release(dl)


@pytest.mark.parametrize("cache_limit", [None, "1gb"])
def test_shard_check_once_per_shard_unless_a_cache_limit_can_evict(pbmc_corpus, tmp_path, monkeypatch, cache_limit):
    """Without a cache limit streaming's per-sample shard check runs once per shard; with one, per sample."""
    corpus, m = pbmc_corpus
    calls = []
    orig = StreamingDataset.prepare_shard
    monkeypatch.setattr(StreamingDataset, "prepare_shard", lambda self, i, blocking=True: (
        calls.append(i), orig(self, i, blocking))[1])
    dl = build_loader(os.path.join(corpus, "mds"), "train", tokenizer=_tok(corpus), batch_size=32,
                      local=str(tmp_path / "cache"), cache_limit=cache_limit)
    ids = _ids(dl)
    n, n_shards = m["split"]["n_cells"]["train"], m["mds"]["shards"]["train"]
    assert len(ids) == len(set(ids)) == n
    if cache_limit is None:
        assert len(calls) <= 2 * n_shards  # download + ready threads may each meet a shard before it is LOCAL
    else:
        assert len(calls) > n // 2  # (the download thread may stop early once the ready thread is done)
    _release(dl)


def test_resume_gives_exactly_the_rest(pbmc_corpus):
    corpus, _ = pbmc_corpus
    tok = _tok(corpus, L=64)
    full_dl = build_loader(corpus, "train", tokenizer=tok, batch_size=50, seed=5)
    full = _ids(full_dl)
    _release(full_dl)
    k = int(np.random.default_rng().integers(2, 20))
    dl = build_loader(corpus, "train", tokenizer=tok, batch_size=50, seed=5)
    first = _ids(dl, limit=k)
    state = dl.state_dict()
    _release(dl)
    dl2 = build_loader(corpus, "train", tokenizer=tok, batch_size=50, seed=5)
    dl2.load_state_dict(state)
    rest = _ids(dl2)
    _release(dl2)
    assert len(first) == 50 * k
    assert first + rest == full  # same order, no overlap, no gap


def test_tokens_same_after_resume(pbmc_corpus):
    """The tokenizer epoch follows the dataset epoch, so a resumed epoch samples the same genes."""
    corpus, _ = pbmc_corpus
    tok = _tok(corpus, L=32)
    dl = build_loader(corpus, "val", tokenizer=tok, batch_size=8, seed=2)
    batches = list(dl)
    _release(dl)
    dl = build_loader(corpus, "val", tokenizer=tok, batch_size=8, seed=2)
    it = iter(dl)
    next(it)
    state = dl.state_dict()
    del it
    _release(dl)
    dl = build_loader(corpus, "val", tokenizer=tok, batch_size=8, seed=2)
    dl.load_state_dict(state)
    again = next(iter(dl))
    assert torch.equal(again["input_ids"], batches[1]["input_ids"])
    _release(dl)


RANK_SCRIPT = """
import json, os, sys
from data_prep.loader import build_loader
from data_prep.tokenize import CellTokenizer
dl = build_loader(sys.argv[1], "train", tokenizer=CellTokenizer(40000, 16, 5), batch_size=10, seed=4)
ids = [i for b in dl for i in b["cell_id"].tolist()]
json.dump({"ids": ids, "state": dl.state_dict()}, open(sys.argv[2], "w"))
"""


def test_two_ranks_get_disjoint_samples(pbmc_corpus, tmp_path):
    corpus, m = pbmc_corpus
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", PYTHONPATH=os.getcwd())
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, corpus, str(tmp_path / f"r{rank}.json")],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    out = [json.load(open(tmp_path / f"r{r}.json")) for r in range(2)]
    r0, r1 = (o["ids"] for o in out)
    n = m["split"]["n_cells"]["train"]
    # after the whole (padded) epoch, each rank's state is the next epoch's start
    assert all((o["state"]["epoch"], o["state"]["sample_in_epoch"]) == (1, 0) for o in out), out[0]["state"]
    assert not set(r0) & set(r1)  # disjoint
    assert len(set(r0) | set(r1)) == n  # together the whole split
    assert len(r0) == len(r1) == -(-n // 2)  # equal shares (streaming repeats a sample to pad an odd split)


RACE_SCRIPT = """
import os, sys, time
from data_prep.loader import TokenizedCellDataset
from data_prep.tokenize import CellTokenizer
split, flag = sys.argv[1], sys.argv[2]
open(flag + "." + sys.argv[3], "w").close()  # imports done
while not os.path.exists(flag):
    time.sleep(0.005)
keep = [TokenizedCellDataset(tokenizer=CellTokenizer(40000, 16, 5), local=split, shuffle=False, batch_size=1)
        for _ in range(3)]
time.sleep(0.5)  # hold the shared memory while the others register theirs
"""


def test_independent_processes_build_datasets_at_once(pbmc_corpus, tmp_path):
    """Six unrelated processes (no torch.distributed, like arms trained side by side) start datasets together.

    streaming alone picks one free shared-memory prefix in several of them and all but one die with
    ``FileExistsError`` (every trial of 5 here); ``streaming_shm_lock`` makes them take turns.
    """
    corpus, _ = pbmc_corpus
    flag = str(tmp_path / "go")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.getcwd()
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, os.path.join(corpus, "mds", "val"), flag, str(i)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(6)]
    deadline = time.monotonic() + 240
    while not all(os.path.exists(f"{flag}.{i}") for i in range(6)) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
        time.sleep(0.05)
    open(flag, "w").close()
    errors = [err[-2000:] for p in procs for _, err in [p.communicate(timeout=240)] if p.returncode]
    assert not errors, errors[0]


def test_shm_lock_falls_back_to_a_per_user_lock_when_the_shared_one_is_not_ours(monkeypatch, tmp_path):
    import filelock

    from data_prep import loader
    monkeypatch.setattr(loader, "SHM_LOCK", str(tmp_path / "shared.lock"))
    taken = []
    acquire = filelock.FileLock.acquire

    def refuse_shared(self, *a, **k):
        if self.lock_file == str(tmp_path / "shared.lock"):
            raise PermissionError(13, "Permission denied", self.lock_file)   # another user's 0644 file
        taken.append(self.lock_file)
        return acquire(self, *a, **k)
    monkeypatch.setattr(filelock.FileLock, "acquire", refuse_shared)
    with loader.streaming_shm_lock():
        pass
    assert taken == [f"{tmp_path / 'shared.lock'}.{os.getuid()}"]


def test_an_empty_split_is_a_clear_error(tmp_path):
    d = tmp_path / "mds" / "val"
    d.mkdir(parents=True)
    (d / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    with pytest.raises(ValueError, match=r"the val split at .*mds/val holds no cells"):
        build_loader(str(tmp_path), "val", tokenizer=CellTokenizer(100, 16, 5), batch_size=2)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_loader(str(tmp_path), "train", tokenizer=CellTokenizer(10, 4), batch_size=2)
    with pytest.raises(ValueError, match="split"):
        build_loader(str(tmp_path), "training", tokenizer=CellTokenizer(10, 4), batch_size=2)


def test_worker_processes_give_the_same_cells_and_tokens(pbmc_corpus):
    corpus, _ = pbmc_corpus
    tok = _tok(corpus, L=48, seed=3)

    def by_cell(num_workers):
        dl = build_loader(corpus, "val", tokenizer=tok, batch_size=16, seed=1, num_workers=num_workers)
        out = {}
        for b in dl:
            cu = b["cu_seqlens"]
            for i, c in enumerate(b["cell_id"].tolist()):
                out[c] = b["input_ids"][cu[i]:cu[i + 1]].tolist()
        _release(dl)
        return out

    a, b = by_cell(0), by_cell(2)
    assert a == b and len(a) > 100


def test_state_at_the_end_of_an_epoch_resumes_into_the_next(pbmc_corpus):
    """A state saved right after an epoch's last batch resumes with the next epoch's first batch
    (streaming alone would replay the finished epoch from its end and yield nothing)."""
    corpus, m = pbmc_corpus
    tok = _tok(corpus, L=32)
    n_val = m["split"]["n_cells"]["val"]
    bs = int(np.random.default_rng().integers(7, 40))
    ref = build_loader(corpus, "val", tokenizer=tok, batch_size=bs, seed=3)
    epoch0 = list(ref)
    epoch1 = list(ref)
    _release(ref)
    assert sum(len(b["cell_id"]) for b in epoch0) == n_val
    dl = build_loader(corpus, "val", tokenizer=tok, batch_size=bs, seed=3)
    it = iter(dl)
    for _ in epoch0:
        next(it)                      # every batch of epoch 0, without asking the iterator for one more
    state = dl.state_dict()
    del it
    _release(dl)
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 0
    dl = build_loader(corpus, "val", tokenizer=tok, batch_size=bs, seed=3)
    dl.load_state_dict(state)
    again = list(dl)
    _release(dl)
    assert [b["cell_id"].tolist() for b in again] == [b["cell_id"].tolist() for b in epoch1]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, epoch1))   # epoch-1 genes
    assert _ids(epoch1) != _ids(epoch0)                                                      # reshuffled
