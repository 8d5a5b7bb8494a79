"""The Gluon Hopper forward (sigattn/hopper_fwd.py) against a float64 reference (skipped without an sm90 GPU).

Same criterion as test_gpu_kernels: ‖ours − ref64‖/‖ref64‖ ≤ 2·‖torch_lowp − ref64‖/‖ref64‖ (+ floor); padded
inputs poisoned with NaN past each length (padding must contribute nothing, padded output rows exactly 0).
Lengths cover 1, 17, non-multiples of the 128 tiles, an all-padding sequence, and many mixed lengths in one
batch (the persistent CTAs' compact walk over the real query tiles, then the padded layout's zero rows).
"""

import pytest
import torch

from test_gpu_kernels import DEVICE, FLOOR, _make, _poison, _rel, math_attention

pytestmark = pytest.mark.gpu


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 (Hopper) GPU")
    from sigattn import hopper_fwd

    if not hopper_fwd.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon Hopper API")
    return hopper_fwd


def run_fwd(layout, dtype, D, H, Hkv, bias, lens, N, seed=None, config=None, max_seqlen=None):
    hf = _hopper()
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed
    q, k, v, do = _make(lens, N, H, Hkv, D, dtype, seed)
    scale = D ** -0.5
    ref = math_attention(*(t.double() for t in (q, k, v, do)), lens, scale, bias, False)[0]
    low = math_attention(q, k, v, do, lens, scale, bias, False)[0]
    kw = dict(scale=scale, bias=0.0 if bias in (None, "log_n") else float(bias), log_n_bias=bias == "log_n",
              causal=False, config=config)
    if layout == "padded":
        seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        pq, pk, pv = (_poison(t, lens) for t in (q, k, v))
        assert hf.supported(pq, pk, pv, False)
        out = hf.launch_fwd(pq, pk, pv, seq, varlen=False, max_seqlen=N, **kw)
    else:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        pack = lambda t: torch.cat([t[i, :L] for i, L in enumerate(lens)])  # noqa: E731
        qp, kp, vp = pack(q), pack(k), pack(v)
        assert hf.supported(qp, kp, vp, False)
        packed = hf.launch_fwd(qp, kp, vp, cu, varlen=True, max_seqlen=max_seqlen or max(lens), **kw)
        out = packed.new_zeros(len(lens), N, H, D)
        for i, L in enumerate(lens):
            out[i, :L] = packed[cu[i]:cu[i + 1]]
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (padding leaked?)"
    for i, L in enumerate(lens):
        assert out[i, L:].count_nonzero() == 0, f"non-zero output at padded rows of sequence {i}"
    e_ours, e_torch = _rel(out, ref), _rel(low, ref)
    assert e_ours <= 2 * e_torch + FLOOR[dtype], f"ours {e_ours:.3g} vs torch {e_torch:.3g} (seed {seed})"
    return e_ours, e_torch


@pytest.mark.parametrize("bias", ["log_n", 0.5, None], ids=["logn", "b0.5", "nobias"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hopper_fwd_matrix(dtype, D, layout, heads, bias):
    N = 300  # not a multiple of the 128 tiles
    run_fwd(layout, dtype, D, heads[0], heads[1], bias, [N, 225, 17, 1, 0, 129], N)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_fwd_mixed_lengths(layout, D):
    # many sequences of very different lengths: work items of every size spread over the persistent CTAs
    g = torch.Generator().manual_seed(D)
    lens = torch.randint(1, 2500, (40,), generator=g).tolist() + [2500, 1, 128, 256, 0]
    run_fwd(layout, torch.bfloat16, D, 4, 2, "log_n", lens, 2500)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_hopper_fwd_walk_skips_and_fills(layout):
    # the compact work walk: every sequence shorter than N (padded: each has zero-row items after the real ones),
    # empty sequences between long ones (groups of 0 items), varlen with max_seqlen far above the longest cell
    lens = [0, 700, 0, 0, 129, 128, 1, 0, 511, 0]
    run_fwd(layout, torch.bfloat16, 128, 3, 1, "log_n", lens, 1000, max_seqlen=4000 if layout == "varlen" else None)


def test_hopper_fwd_few_items():
    # fewer work items than SMs, one token (8 heads: with one head the whole output is one p·v, and the 2x-torch
    # criterion compares two roundings of a single scalar)
    run_fwd("varlen", torch.bfloat16, 128, 8, 8, "log_n", [1], 1)
    run_fwd("padded", torch.bfloat16, 64, 2, 1, 0.5, [5], 5)


@pytest.mark.parametrize("config", [(128, 64, 4, 1, 0), (128, 128, 2, 1, 0), (128, 64, 4, 2, 0), (128, 128, 3, 2, 0),
                                    (128, 64, 4, 1, 1), (128, 64, 4, 1, 2), (128, 64, 4, 1, 3), (128, 64, 4, 2, 1),
                                    (128, 64, 4, 1, 3, 2), (128, 64, 8, 1, 3, 2), (128, 64, 4, 1, 0, 2),
                                    (128, 64, 4, 2, 3, 3), (128, 128, 3, 2, 3, 3), (128, 64, 3, 2, 3, 3),
                                    (128, 64, 4, 2, 3, 4), (128, 64, 3, 2, 3, 4)],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_fwd_configs(D, layout, config):
    # every tiling / consumer layout / sigmoid form (SIG) / pipeline depth the kernel offers: partial key tiles, the
    # V-tail clean-up, GQA; with 64-key tiles the lengths give 1, 2, 4, 5 and 12 tiles (odd/even counts, 0-3 loop
    # iterations of the paired DEPTH-2 loop); CONSUMERS 2 = two 4-warp consumers, consumer 0 issuing the loads
    # (STAGES ≥ 3: the tightest ring its producer cursor allows); DEPTH 3 = those two in ping-pong (turn mbarriers),
    # DEPTH 4 = on named barriers with σ pinned ahead of the turn
    if config[2] * 2 * config[1] * D * 2 + 4 * config[0] * D > 200 * 1024:
        pytest.skip("does not fit in shared memory")
    run_fwd(layout, torch.bfloat16, D, 4, 2, "log_n", [300, 64, 65, 1, 0, 200, 768], 768, config=config)


@pytest.mark.parametrize("config", [(128, 64, 3, 2, 3, 1), (128, 64, 4, 2, 3, 3), (128, 64, 4, 2, 3, 4)],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_hopper_producer_cursor_across_many_short_cells(layout, config):
    # consumer 0's load cursor runs ahead across items: 96 cells of 0-140 tokens (1-3 key tiles, empty cells, query
    # tiles past a cell's end) over 4 heads give each persistent CTA ~18 items, most of them shorter than the ring
    gen = torch.Generator().manual_seed(7)
    lens = torch.randint(0, 141, (96,), generator=gen).tolist()
    run_fwd(layout, torch.bfloat16, 128, 4, 4, "log_n", lens, 768, config=config)


def test_hopper_unsupported_falls_back():
    hf = _hopper()
    q = torch.randn(2, 64, 4, 96, device=DEVICE, dtype=torch.bfloat16)
    assert not hf.supported(q, q, q, False)  # D = 96
    q = torch.randn(2, 64, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    assert not hf.supported(q, q, q, True)  # causal
    assert not hf.supported(q.float(), q.float(), q.float(), False)  # fp32


def test_ops_dispatch_uses_hopper(monkeypatch):
    """On sm90 the registered ``sigattn::`` CUDA ops run the Hopper forward for supported inputs."""
    hf = _hopper()
    from sigattn import triton_ops

    calls = []
    real = hf.launch_fwd
    monkeypatch.setattr(hf, "launch_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(2, 130, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    seq = torch.tensor([130, 7], dtype=torch.int32, device=DEVICE)
    out = triton_ops.attn_fwd(q, q, q, seq, 128 ** -0.5, 0.0, True, False)
    assert calls, "sm90 dispatch did not take the Hopper kernel"
    from sigattn.triton_fwd import launch_fwd as portable

    want = portable(q, q, q, seq, varlen=False, max_seqlen=130, scale=128 ** -0.5, bias=0.0, log_n_bias=True,
                    causal=False)
    assert _rel(out, want) < 1e-2


@pytest.fixture
def nan_fill():
    """torch's deterministic mode with ``fill_uninitialized_memory``: every torch.empty (the kernel's output too)
    reads NaN, so a row the kernel never writes fails the finite check on every run, not only when leftover memory
    happens to hold a NaN (session 18's NaN quality arm)."""
    before = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = before


@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_fwd_writes_every_row_under_the_nan_fill(nan_fill, layout, D):
    # cells as training.embed packs them (1-2048 tokens, tile edges among them); 2 heads keep the float64
    # reference's scores (cells × heads × 2048²) near 1 GB
    assert torch.empty(8, device=DEVICE).isnan().all()
    gen = torch.Generator().manual_seed(D + (layout == "varlen"))
    lens = torch.randint(1, 2049, (18,), generator=gen).tolist() + [1, 2, 127, 128, 129, 2048]
    run_fwd(layout, torch.bfloat16, D, 2, 2, "log_n", lens, 2048)
