"""The Gluon Hopper backward (sigattn/hopper_bwd.py, dispatched only with SIGATTN_HOPPER_BWD=1: it measured slower than the
portable one) against float64 gradients (sm90 only), every dQ variant (its own kernel; fp32 reductions from the K/V
kernel, by vector reductions from registers or by TMA reductions from shared memory).

Same criterion as test_gpu_kernels: per gradient ‖ours − ref64‖/‖ref64‖ ≤ 2·‖torch_lowp − ref64‖/‖ref64‖ (+ floor);
padded inputs (q, k, v and dO) poisoned with NaN past each length, padded gradient rows exactly 0; lengths 1, 17,
non-multiples of the 64/128 tiles, empty sequences, GQA/MQA, three bias modes, bf16/fp16, D 64/128.
"""

import pytest
import torch

from test_gpu_kernels import DEVICE, FLOOR, _make, _poison, _rel, math_attention

pytestmark = pytest.mark.gpu


def _hopper_bwd():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 (Hopper) GPU")
    from sigattn import hopper_bwd

    if not hopper_bwd.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon Hopper API")
    return hopper_bwd


def run_bwd(layout, dtype, D, H, Hkv, bias, lens, N, seed=None, dq_atomic=False, overlap=None, sig=None,
            kv_blocks=None):
    hb = _hopper_bwd()
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed
    q, k, v, do = _make(lens, N, H, Hkv, D, dtype, seed)
    scale = D ** -0.5
    ref = math_attention(*(t.double() for t in (q, k, v, do)), lens, scale, bias, False)[1:]
    low = math_attention(q, k, v, do, lens, scale, bias, False)[1:]
    kw = dict(scale=scale, bias=0.0 if bias in (None, "log_n") else float(bias), log_n_bias=bias == "log_n",
              causal=False, dq_atomic=dq_atomic, overlap=overlap, sig=sig, kv_blocks=kv_blocks)
    if layout == "padded":
        seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        pq, pk, pv, pdo = (_poison(t, lens) for t in (q, k, v, do))
        assert hb.supported(pdo, pq, pk, pv, False)
        grads = hb.launch_bwd(pdo, pq, pk, pv, seq, varlen=False, max_seqlen=N, **kw)
    else:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        pack = lambda t: torch.cat([t[i, :L] for i, L in enumerate(lens)])  # noqa: E731
        packed = hb.launch_bwd(pack(do), pack(q), pack(k), pack(v), cu, varlen=True, max_seqlen=max(lens), **kw)
        grads = []
        for g, like in zip(packed, (q, k, v)):
            full = like.new_zeros(like.shape)
            for i, L in enumerate(lens):
                full[i, :L] = g[cu[i]:cu[i + 1]]
            grads.append(full)
    for name, ours, r, lo in zip(("dq", "dk", "dv"), grads, ref, low):
        assert ours.dtype == dtype and ours.shape == r.shape, name
        assert torch.isfinite(ours).all(), f"{name}: non-finite (padding leaked?)"
        for i, L in enumerate(lens):
            assert ours[i, L:].count_nonzero() == 0, f"{name}: non-zero gradient at padded rows of sequence {i}"
        e_ours, e_torch = _rel(ours, r), _rel(lo, r)
        assert e_ours <= 2 * e_torch + FLOOR[dtype], f"{name}: ours {e_ours:.3g} vs torch {e_torch:.3g} (seed {seed})"


DQ = pytest.mark.parametrize("dq_atomic", [False, True, "tma"], ids=["dqkernel", "dqatomic", "dqtma"])
# with the TMA reductions' serial form too (hopper_bwd.DQ_TMA = 1), where many tiles add into the same rows
DQ_ALL = pytest.mark.parametrize("dq_atomic", [False, True, "tma", "tma1"], ids=["dqkernel", "dqatomic", "dqtma", "dqtma1"])


@DQ
@pytest.mark.parametrize("bias", ["log_n", 0.5, None], ids=["logn", "b0.5", "nobias"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hopper_bwd_matrix(dtype, D, layout, heads, bias, dq_atomic):
    # N = 300: not a multiple of the 64/128 tiles; with dq_atomic the key tile past each length is poisoned with
    # NaN (padded) or holds the next cell (varlen), and both must stay out of dQ
    N = 300
    run_bwd(layout, dtype, D, heads[0], heads[1], bias, [N, 225, 17, 1, 0, 129], N, dq_atomic=dq_atomic)


@pytest.mark.parametrize("overlap", [0, 1])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_bwd_overlap_levels(D, layout, overlap):
    # the default (hopper_bwd.OVERLAP = 2) runs in every other test; the lower levels of the 7-GEMM kernels here
    run_bwd(layout, torch.bfloat16, D, 4, 2, "log_n", [300, 225, 17, 1, 0, 129], 300, overlap=overlap)


@DQ
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_hopper_bwd_sigmoid_form_2(layout, dtype, dq_atomic):
    # σ by ex2 + rcp.approx (hopper_bwd.SIG_BWD's alternative, timed no faster); bias 0.5 pushes many P toward 1, where dS is fragile
    run_bwd(layout, dtype, 128, 4, 2, 0.5, [300, 225, 17, 1, 0, 129], 300, dq_atomic=dq_atomic, sig=2)


@DQ_ALL
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_hopper_bwd_mixed_lengths(layout, dq_atomic):
    # many key tiles adding into the same dQ rows at once (the atomic variant's reduction)
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 1100, (12,), generator=g).tolist() + [1100, 64, 128, 0]
    run_bwd(layout, torch.bfloat16, 128, 4, 2, "log_n", lens, 1100, dq_atomic=dq_atomic)


@DQ
@pytest.mark.parametrize("bias", ["log_n", 0.5], ids=["logn", "b0.5"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_hopper_bwd_d64_query_tiles_of_128(layout, bias, dq_atomic):
    # D = 64 with 128-row query tiles in the kv kernel (kv_blocks=(128, 128); sm90 build, padded / varlen: 244 / 241
    # registers for the 7-GEMM one, 242–255 for the 5-GEMM ones, no spills; timed in session 16: not adopted)
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 700, (6,), generator=g).tolist() + [700, 128, 129, 1, 0]
    run_bwd(layout, torch.bfloat16, 64, 4, 2, bias, lens, 700, dq_atomic=dq_atomic, kv_blocks=(128, 128))


@DQ_ALL
def test_hopper_bwd_matches_portable_on_a_long_sequence(dq_atomic):
    # 4K tokens: many query tiles per key tile (the kv kernel's double-buffered walk) and vice versa
    hb = _hopper_bwd()
    from sigattn.triton_bwd import launch_bwd as portable

    q, k, v, do = _make([4096, 3000], 4096, 8, 2, 128, torch.bfloat16, 11)
    seq = torch.tensor([4096, 3000], dtype=torch.int32, device=DEVICE)
    kw = dict(varlen=False, max_seqlen=4096, scale=128 ** -0.5, bias=0.0, log_n_bias=True, causal=False)
    want = portable(do, q, k, v, seq, deterministic=True, **kw)
    got = hb.launch_bwd(do, q, k, v, seq, dq_atomic=dq_atomic, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert _rel(a, b) < 2e-2, name


def _variant(env: str):
    """SIGATTN_HOPPER_DQ_ATOMIC's value → launch_bwd's dq_atomic."""
    return "tma" if env == "tma" else env == "1"


@pytest.mark.parametrize("atomic", ["0", "1", "tma"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_public_api_backward_goes_to_hopper_when_opted_in(layout, atomic, monkeypatch):
    """SIGATTN_HOPPER_BWD=1: the ops' CUDA backward (through autograd of the public API) is the Hopper kernel's
    (the variant SIGATTN_HOPPER_DQ_ATOMIC picks), bit for bit but for dQ's atomic adds; without it, the portable
    kernel's."""
    hb = _hopper_bwd()
    monkeypatch.setenv("SIGATTN_HOPPER_DQ_ATOMIC", atomic)
    import sigattn
    from sigattn.triton_bwd import launch_bwd as portable

    lens = [300, 17, 1]
    q, k, v, do = _make(lens, 300, 4, 2, 128, torch.bfloat16, 5)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kw = dict(scale=128 ** -0.5, bias=0.0, log_n_bias=True, causal=False)
    if layout == "padded":
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        want = {"1": hb.launch_bwd(do, q, k, v, seq, varlen=False, max_seqlen=300, dq_atomic=_variant(atomic), **kw),
                "0": portable(do, q, k, v, seq, varlen=False, max_seqlen=300, **kw)}

        def api():
            return sigattn.sigmoid_attention(*args, seq_lens=seq)
        grad_out = do
    else:
        cu = torch.tensor([0, 300, 317, 318], dtype=torch.int32, device=DEVICE)
        pack = lambda t: torch.cat([t[i, :L] for i, L in enumerate(lens)])  # noqa: E731
        pq, pk, pv, pdo = (pack(t) for t in (q, k, v, do))
        args = [t.clone().requires_grad_() for t in (pq, pk, pv)]
        want = {"1": hb.launch_bwd(pdo, pq, pk, pv, cu, varlen=True, max_seqlen=300, dq_atomic=_variant(atomic),
                                   **kw),
                "0": portable(pdo, pq, pk, pv, cu, varlen=True, max_seqlen=300, **kw)}

        def api():
            return sigattn.sigmoid_attention_varlen(*args, cu, 300)
        grad_out = pdo
    for flag in ("1", "0"):
        monkeypatch.setenv("SIGATTN_HOPPER_BWD", flag)
        for a in args:
            a.grad = None
        api().backward(grad_out)
        for name, a, w in zip(("dq", "dk", "dv"), args, want[flag]):
            if flag == "1" and not (atomic != "0" and name == "dq"):  # no atomics: the same bits on every call
                assert torch.equal(a.grad, w), f"{name}: the opted-in backward is not the Hopper kernel's"
            elif flag == "1":   # dQ by atomic adds: order-dependent rounding
                assert _rel(a.grad, w) < 1e-2, f"{name}: the opted-in backward is not the Hopper kernel's"
            else:               # the portable one may add dq with atomics (order-dependent rounding)
                assert _rel(a.grad, w) < 1e-2, f"{name}: the default backward is not the portable kernel's"
