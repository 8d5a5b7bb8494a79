"""training.distributed: launcher environments → RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; synthetic loader sharding."""

import numpy as np
import pytest

from training.distributed import export_env

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for k in (*VARS, "SUBMITIT_EXECUTOR", "DS_ACCELERATOR"):
        monkeypatch.setenv(k, "")        # records the original value (or absence) for teardown ...
        monkeypatch.delenv(k)            # ... so what export_env sets is undone after the test
    for k in list(__import__("os").environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    return monkeypatch


def test_slurm_variables_become_torch_variables(clean_env):
    import os
    rng = np.random.default_rng()
    job = int(rng.integers(1000, 99999))
    for k, v in {"SLURM_JOB_ID": str(job), "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                 "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2",
                 "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}.items():
        clean_env.setenv(k, v)
    export_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "1"


def test_existing_launcher_variables_win(clean_env):
    import os
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                 "SLURM_PROCID": "0", "SLURM_JOB_ID": "5"}.items():
        clean_env.setenv(k, v)
    export_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "0")


def test_single_process_defaults(clean_env):
    import os
    export_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1") and int(os.environ["MASTER_PORT"]) > 0


def test_synthetic_loader_shards_and_resumes():
    from itertools import islice

    from data_prep.tokenize import CellTokenizer
    from training.synthetic import SyntheticCellLoader
    tok = CellTokenizer(3000, context_length=200, n_bins=11)
    ranks = [SyntheticCellLoader(tok, 3, mean_genes=120, rank=r, world_size=2) for r in range(2)]
    seen = [[b["cell_id"].tolist() for b in islice(iter(ld), 4)] for ld in ranks]
    flat = [c for r in seen for b in r for c in b]
    assert len(flat) == len(set(flat)) == 24 and set(flat) == set(range(24))
    fresh = SyntheticCellLoader(tok, 3, mean_genes=120, rank=1, world_size=2, num_workers=2)
    fresh.load_state_dict({"batches": 2})
    b = next(iter(fresh))
    assert b["cell_id"].tolist() == seen[1][2] and b["max_seqlen"] <= 200
    assert int(b["cu_seqlens"][-1]) == b["input_ids"].numel()


def test_free_ports_lie_outside_the_ephemeral_range_and_skip_bound_and_excluded_ones(monkeypatch):
    import socket

    from training import ports

    picked = {ports.free_port() for _ in range(20)}
    assert all(20000 <= p < 32768 for p in picked) and len(picked) > 1      # Linux ephemeral: 32768–60999; random
    a = ports.free_port()
    b = ports.free_port(exclude=(a,))
    c = ports.free_port(exclude=(a, b))
    assert len({a, b, c}) == 3
    with socket.socket() as held:
        held.bind(("127.0.0.1", a))                                        # bound: never handed out
        monkeypatch.setattr(ports, "RENDEZVOUS_PORTS", [a, b, c])
        assert {ports.free_port(exclude=(c,)) for _ in range(10)} == {b}
        with pytest.raises(RuntimeError, match="no free TCP port"):
            ports.free_port(exclude=(b, c))


def test_host_threads_share_the_cores_among_a_nodes_ranks():
    from training.distributed import host_threads

    assert host_threads(4, 64) == 16
    assert host_threads(4, 2) == 1
    assert host_threads(3, 16) == 5
    assert host_threads(1, 8) == 8


def test_share_host_threads_only_where_ranks_would_oversubscribe(clean_env):
    import os

    import torch

    from training.distributed import share_host_threads

    before = torch.get_num_threads()
    clean_env.delenv("OMP_NUM_THREADS", raising=False)
    clean_env.setattr(os, "cpu_count", lambda: 64)
    clean_env.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    try:
        assert share_host_threads() is None                       # one rank on the node: untouched
        clean_env.setenv("LOCAL_WORLD_SIZE", "4")
        assert share_host_threads() == 16 and torch.get_num_threads() == 16
        clean_env.setenv("OMP_NUM_THREADS", "3")                  # the user's / torchrun's choice wins
        assert share_host_threads() is None
        clean_env.delenv("OMP_NUM_THREADS")
        clean_env.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))   # Slurm bound the rank already
        assert share_host_threads() is None
    finally:
        torch.set_num_threads(before)
