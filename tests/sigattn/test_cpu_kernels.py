"""C++ CPU kernels (through the public API) vs the float64 reference on fresh random inputs: forward and all three
gradients, padded and varlen layouts, padding, GQA/MQA, causal, bias modes, dtypes, head dims.

Tolerance rule: kernel error ≤ 2 × the error of the same math run by PyTorch in the input dtype (both vs float64),
plus a small floor relative to the output magnitude (1e-5 for fp32, where both errors are near rounding level)."""

import itertools

import pytest
import torch

from sigattn import sigmoid_attention, sigmoid_attention_varlen
from sigattn.reference import sigmoid_attention_ref, sigmoid_attention_varlen_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [32, 64, 96, 128, 256]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
BIASES = ["log_n", 0.7, None]


def _lengths(N: int, B: int) -> list[int]:
    """Full, 25% padded, 50% padded, all-padding, then random; trimmed to B."""
    fixed = [N, N - N // 4, N - N // 2, 0]
    return (fixed + torch.randint(0, N + 1, (B,)).tolist())[:B]


def _inputs(B, N, H, H_kv, D, dtype):
    q = torch.randn(B, N, H, D).to(dtype)
    k = torch.randn(B, N, H_kv, D).to(dtype)
    v = torch.randn(B, N, H_kv, D).to(dtype)
    return q, k, v


def _run(fn, q, k, v, grad, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(grad.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _assert_within_rule(name, got, lowp, ref, dtype):
    err = (got.double() - ref).abs().max().item()
    err_lowp = (lowp.double() - ref).abs().max().item()
    floor = (1e-5 if dtype == torch.float32 else 1e-3) * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_lowp + floor, f"{name}: error {err:.3g} > 2 × low-precision error {err_lowp:.3g} + {floor:.2g}"


def _cases():
    """Every N × dtype × causal; bias mode, head layout and head dim rotate so each value meets several others."""
    for i, (N, dtype, causal) in enumerate(itertools.product([1, 17, 100, 257], DTYPES, [False, True])):
        yield pytest.param(N, dtype, causal, BIASES[i % 3], HEADS[(i // 3) % 3], HEAD_DIMS[i % 5],
                           id=f"N{N}-{str(dtype)[6:]}-{'causal' if causal else 'full'}-b{BIASES[i % 3]}"
                              f"-H{HEADS[(i // 3) % 3]}-D{HEAD_DIMS[i % 5]}")


@pytest.mark.parametrize("N,dtype,causal,bias,heads,D", list(_cases()))
def test_padded_matches_reference(N, dtype, causal, bias, heads, D):
    (H, H_kv), B = heads, 5
    q, k, v = _inputs(B, N, H, H_kv, D, dtype)
    lens = torch.tensor(_lengths(N, B), dtype=torch.int32)
    grad = torch.randn(B, N, H, D)
    kw = dict(seq_lens=lens, bias=bias, causal=causal)
    got = _run(sigmoid_attention, q, k, v, grad, **kw)
    ref = _run(sigmoid_attention_ref, q.double(), k.double(), v.double(), grad.double(), **kw)
    lowp = _run(lambda *a, **w: sigmoid_attention_ref(*a, **w, dtype=dtype), q, k, v, grad, **kw)
    for name, g, lp, r in zip(["out", "dq", "dk", "dv"], got, lowp, ref):
        assert g.dtype == dtype and g.shape == r.shape
        _assert_within_rule(name, g, lp, r, dtype)
    # padded positions: exactly 0 in the output and in all gradients, although grad_out is non-zero there
    for b, n in enumerate(lens.tolist()):
        for name, g in zip(["out", "dq", "dk", "dv"], got):
            assert torch.all(g[b, n:] == 0), f"{name} non-zero at padded positions of sequence {b} (len {n})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_padded_and_reference(dtype, causal):
    B, N, H, H_kv, D = 4, 70, 4, 2, 64
    q, k, v = _inputs(B, N, H, H_kv, D, dtype)
    lens = torch.tensor([N, 0, 1, 37], dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    pack = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lens.tolist())])  # noqa: E731
    grad = torch.randn(B, N, H, D)
    padded = _run(sigmoid_attention, q, k, v, grad, seq_lens=lens, causal=causal)
    kw = dict(cu_seqlens=cu, causal=causal)
    varlen = _run(lambda *a, **w: sigmoid_attention_varlen(*a, max_seqlen=N, **w), pack(q), pack(k), pack(v),
                  pack(grad), **kw)
    ref = _run(sigmoid_attention_varlen_ref, pack(q).double(), pack(k).double(), pack(v).double(),
               pack(grad).double(), **kw)
    lowp = _run(lambda *a, **w: sigmoid_attention_varlen_ref(*a, **w, dtype=dtype), pack(q), pack(k), pack(v),
                pack(grad), **kw)
    for name, p, vl, lp, r in zip(["out", "dq", "dk", "dv"], padded, varlen, lowp, ref):
        torch.testing.assert_close(vl, pack(p), msg=f"{name}: varlen and padded layouts disagree")
        _assert_within_rule(name, vl, lp, r, dtype)


@pytest.mark.parametrize("bias", BIASES)
def test_bias_modes_shift_logits(bias):
    """The bias modes differ only in b: all-ones q·k = 0 logits, so out = n · sigmoid(b) · v for constant v."""
    n, N = 9, 12
    q = torch.zeros(1, N, 1, 32)
    k = torch.zeros(1, N, 1, 32)
    v = torch.ones(1, N, 1, 32)
    out = sigmoid_attention(q, k, v, seq_lens=torch.tensor([n], dtype=torch.int32), bias=bias)
    b = {"log_n": -torch.log(torch.tensor(float(n))).item(), 0.7: 0.7, None: 0.0}[bias]
    expected = n * torch.sigmoid(torch.tensor(b)).item()
    torch.testing.assert_close(out[0, :n], torch.full((n, 1, 32), expected))
    assert torch.all(out[0, n:] == 0)


def test_strided_inputs():
    """Views of a fused QKV projection (non-contiguous) give the same result as contiguous copies."""
    B, N, H, D = 2, 33, 4, 32
    qkv = torch.randn(B, N, 3, H, D)
    q, k, v = qkv.unbind(2)
    lens = torch.tensor([33, 20], dtype=torch.int32)
    assert not q.is_contiguous()
    torch.testing.assert_close(sigmoid_attention(q, k, v, seq_lens=lens),
                               sigmoid_attention(q.contiguous(), k.contiguous(), v.contiguous(), seq_lens=lens))


def test_no_seq_lens_means_all_valid():
    q, k, v = _inputs(2, 19, 2, 2, 32, torch.float32)
    full = torch.tensor([19, 19], dtype=torch.int32)
    torch.testing.assert_close(sigmoid_attention(q, k, v), sigmoid_attention(q, k, v, seq_lens=full))
