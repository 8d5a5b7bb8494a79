"""Context parallelism (training.parallel) on CPU/gloo: sharding, the Ulysses attention layer vs one process
(forward and every gradient), and config/world validation. Multi-process training runs: test_context_parallel_train.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from trainer_helpers import ATTENTION_KINDS, skip_unless_sigattn
from training.ports import free_port


# ---------------------------------------------------------------- sharding (one process)

@pytest.mark.parametrize("P", [2, 3, 4])
def test_shards_are_balanced_and_rebuild_the_padded_stream(P):
    from training.parallel import shard_batch
    rng = np.random.default_rng()
    lengths = [int(n) for n in rng.integers(1, 9, size=int(rng.integers(1, 7)))] + [1]   # some shorter than P
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    T = int(cu[-1])
    batch = {"input_ids": torch.randint(3, 100, (T,)), "values": torch.randint(1, 12, (T,)), "cu_seqlens": cu,
             "max_seqlen": max(lengths), "cell_id": torch.arange(len(lengths))}
    masked = torch.rand(T) < 0.4
    masked[0] = True
    shards = [shard_batch(batch, masked, P, r) for r in range(P)]
    t = -(-T // P)
    assert all(b["input_ids"].shape == b["values"].shape == m.shape == (t,) for b, m in shards)  # balanced
    ids = torch.cat([b["input_ids"] for b, _ in shards])
    assert torch.equal(ids[:T], batch["input_ids"]) and torch.all(ids[T:] == 0)
    assert torch.equal(torch.cat([b["values"] for b, _ in shards])[:T], batch["values"])
    m = torch.cat([m for _, m in shards])
    assert torch.equal(m[:T], masked) and not m[T:].any()                # pad tokens are never masked
    for b, _ in shards:
        assert int(b["loss_denominator"]) == int(masked.sum())
        pad = P * t - T
        want = cu.tolist() + ([P * t] if pad else [])
        assert b["cu_seqlens"].tolist() == want and b["cu_seqlens"].dtype == torch.int32
        assert b["max_seqlen"] == max(max(lengths), pad)
        assert torch.equal(b["cell_id"], batch["cell_id"])
    with pytest.raises(ValueError, match="outside a group"):
        shard_batch(batch, masked, P, P)


def test_config_validates_the_degree():
    from training.config import load_config
    from training.parallel.dims import check_degree
    assert load_config(None, []).parallel.context_parallel_degree == 1
    assert load_config(None, ["parallel.context_parallel_degree=2"]).parallel.context_parallel_degree == 2
    with pytest.raises(ValueError, match="must be >= 1"):
        load_config(None, ["parallel.context_parallel_degree=0"])
    assert load_config(None, ["parallel.context_parallel_degree=3"]).parallel.context_parallel_degree == 3  # uneven
    with pytest.raises(ValueError, match="degree=5 exceeds model.n_heads=4 = 4 heads"):
        load_config(None, ["parallel.context_parallel_degree=5"])
    with pytest.raises(ValueError, match="expected int"):
        load_config(None, ["parallel.context_parallel_degree=two"])
    cfg = load_config(None, ["parallel.context_parallel_degree=2", "parallel.context_parallel_chunks=2"])
    assert cfg.parallel.context_parallel_chunks == 2
    with pytest.raises(ValueError, match="context_parallel_chunks must be >= 1"):
        load_config(None, ["parallel.context_parallel_degree=2", "parallel.context_parallel_chunks=0"])
    with pytest.raises(ValueError, match="needs parallel.context_parallel_degree > 1"):
        load_config(None, ["parallel.context_parallel_chunks=2"])
    with pytest.raises(ValueError, match="degree=4 exceeds model.n_heads=4 / parallel.context_parallel_chunks=2 = 2"):
        load_config(None, ["parallel.context_parallel_degree=4", "parallel.context_parallel_chunks=2"])
    with pytest.raises(ValueError, match="context_parallel_chunks=3 does not divide model.n_heads=4"):
        load_config(None, ["parallel.context_parallel_degree=2", "parallel.context_parallel_chunks=3"])
    assert load_config(None, ["parallel.context_parallel_degree=2",
                              "parallel.context_parallel_exchange=ours"]).parallel.context_parallel_exchange == "ours"
    with pytest.raises(ValueError, match="context_parallel_exchange must be one of auto, deepspeed, ours, got 'ring'"):
        load_config(None, ["parallel.context_parallel_exchange=ring"])
    with pytest.raises(ValueError, match="exchange=deepspeed cannot pipeline head chunks"):
        load_config(None, ["parallel.context_parallel_degree=2", "parallel.context_parallel_chunks=2",
                           "parallel.context_parallel_exchange=deepspeed"])
    with pytest.raises(ValueError, match="deepspeed needs parallel.context_parallel_degree=3 to divide"):
        load_config(None, ["parallel.context_parallel_degree=3", "parallel.context_parallel_exchange=deepspeed"])
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        check_degree(4, 6, 8)
    check_degree(2, 6, 8)


# ---------------------------------------------------------------- the attention layer across P ranks

def _attention_worker(rank: int, P: int, port: int, seed: int, kinds: list[str], chunks: int, H: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(P), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from training.attention import Attention
    from training.parallel import apply_context_parallel
    from training.parallel.sharding import CPShard

    deepspeed.init_distributed(dist_backend="gloo")
    group = dist.new_group(list(range(P)))
    rng = np.random.default_rng(seed)
    cases = [[5, 1, 3, 2], [1, 2, 1], [int(n) for n in rng.integers(1, 23, size=5)]]  # odd; shorter than P; random
    try:
        for kind in kinds:
            for lengths in cases:
                g = torch.Generator().manual_seed(int(rng.integers(2**31)))
                d = 24
                torch.manual_seed(int(rng.integers(2**31)))
                ref = Attention(d, H, kind).double()
                for p in ref.parameters():       # non-zero biases too, so their gradients are exercised
                    torch.nn.init.normal_(p, std=0.3, generator=g)
                cp = Attention(d, H, kind).double()
                cp.load_state_dict(ref.state_dict())
                apply_context_parallel(cp, group, chunks=chunks)
                cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
                T, L = int(cu[-1]), max(lengths)
                s = CPShard(T, P, rank)
                x = torch.randn(s.padded, d, generator=g, dtype=torch.float64)   # pad rows random: must not leak
                w = torch.randn(s.padded, d, generator=g, dtype=torch.float64)
                w[T:] = 0                                                        # pad tokens carry no loss

                xr = x[:T].clone().requires_grad_()
                out_ref = ref(xr, cu, L)
                (out_ref * w[:T]).sum().backward()

                xl = x[s.start:s.stop].clone().requires_grad_()
                out = cp(xl, s.cu_seqlens(cu), max(L, s.pad))
                (out * w[s.start:s.stop]).sum().backward()

                real = slice(0, max(0, min(s.stop, T) - s.start))
                what = f"{kind} P={P} chunks={chunks} rank {rank} lengths {lengths}"
                with torch.no_grad():                                            # evaluation: no graph kept
                    torch.testing.assert_close(cp(xl, s.cu_seqlens(cu), max(L, s.pad)), out, rtol=0, atol=0)
                torch.testing.assert_close(out[real], out_ref[s.start:s.start + real.stop], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"forward, {what}: {m}")
                torch.testing.assert_close(xl.grad[real], xr.grad[s.start:s.start + real.stop], rtol=1e-10,
                                           atol=1e-12, msg=lambda m: f"dx, {what}: {m}")
                assert torch.all(xl.grad[real.stop:] == 0), f"pad tokens got gradient, {what}"
                for (name, p), pr in zip(cp.named_parameters(), ref.parameters()):
                    gsum = p.grad.clone()
                    dist.all_reduce(gsum, group=group)          # DeepSpeed reduces over the CP group too
                    torch.testing.assert_close(gsum, pr.grad, rtol=1e-10, atol=1e-12,
                                               msg=lambda m: f"d{name}, {what}: {m}")
                    if real.stop == 0:                      # a shard of pad tokens only (P=3, 4 tokens)
                        assert p.grad.count_nonzero() == 0, f"d{name} from pad tokens only, {what}"
                    else:
                        assert p.grad.abs().sum() > 0 or pr.grad.abs().sum() == 0
    finally:
        dist.destroy_process_group()


@pytest.mark.slow     # spawns P processes that import torch + DeepSpeed: ~50 s (P=2) to ~100 s (P=4) on 2 loaded cores
@pytest.mark.parametrize("P, chunks, H", [(2, 1, 4), (4, 1, 4), (4, 2, 8), (3, 1, 4), (2, 2, 6)])
def test_ulysses_attention_equals_one_process_forward_and_every_gradient(P, chunks, H):
    """P | H, one chunk: DeepSpeed's exchange; chunks > 1: ours, pipelined (head chunks whose all-to-alls overlap
    attention); P ∤ H (3 ranks, 4 heads: 2/1/1; 2 chunks of 3 heads on 2 ranks: 2/1): ours, uneven heads."""
    kinds = list(ATTENTION_KINDS)
    for k in ATTENTION_KINDS:
        try:
            skip_unless_sigattn(k)
        except pytest.skip.Exception:
            kinds.remove(k)
    assert kinds
    seed = int(np.random.default_rng().integers(2**31))
    mp.start_processes(_attention_worker, args=(P, free_port(), seed, kinds, chunks, H), nprocs=P, start_method="spawn")
    if "sigmoid" not in kinds:
        pytest.skip("sigmoid not built: only softmax checked")


def test_degrees_beyond_the_heads_are_refused_and_the_exchange_is_chosen():
    from training.attention import Attention
    from training.parallel.ulysses import apply_context_parallel

    class FakeGroup:
        pass
    import torch.distributed as dist
    orig = dist.get_world_size
    dist.get_world_size = lambda group=None: 5
    try:
        with pytest.raises(ValueError, match="degree=5 exceeds model.n_heads=4"):
            apply_context_parallel(Attention(8, 4), FakeGroup())
        dist.get_world_size = lambda group=None: 2
        with pytest.raises(ValueError, match="degree=2 exceeds model.n_heads=4 / parallel.context_parallel_chunks=4"):
            apply_context_parallel(Attention(8, 4), FakeGroup(), chunks=4)
        from training.parallel.ulysses import UlyssesVarlen
        from training.parallel.ulysses_pipelined import UlyssesPipelined, head_split
        kinds = {}
        for P, chunks in [(2, 1), (3, 1), (2, 2)]:
            dist.get_world_size = lambda group=None, P=P: P
            kinds[P, chunks] = type(apply_context_parallel(Attention(8, 4), FakeGroup(), chunks).context_parallel)
        # DeepSpeed's exchange where it applies (P | H, one chunk); ours for uneven heads or chunks
        assert kinds == {(2, 1): UlyssesVarlen, (3, 1): UlyssesPipelined, (2, 2): UlyssesPipelined}
        # parallel.context_parallel_exchange forces one: ours at P | H with one chunk (the A/B timing); DeepSpeed's
        # refuses what it cannot do
        dist.get_world_size = lambda group=None: 2
        assert type(apply_context_parallel(Attention(8, 4), FakeGroup(), 1, "ours").context_parallel) is UlyssesPipelined
        assert type(apply_context_parallel(Attention(8, 4), FakeGroup(), 1, "deepspeed").context_parallel) is UlyssesVarlen
        with pytest.raises(ValueError, match="deepspeed cannot pipeline head chunks \\(parallel.context_parallel_chunks=2\\)"):
            apply_context_parallel(Attention(8, 4), FakeGroup(), 2, "deepspeed")
        dist.get_world_size = lambda group=None: 3
        with pytest.raises(ValueError, match="deepspeed needs parallel.context_parallel_degree=3 to divide model.n_heads=4"):
            apply_context_parallel(Attention(8, 4), FakeGroup(), 1, "deepspeed")
        assert head_split(12, 8) == [2, 2, 2, 2, 1, 1, 1, 1] and head_split(4, 3) == [2, 1, 1]
        assert head_split(8, 4) == [2] * 4
    finally:
        dist.get_world_size = orig
