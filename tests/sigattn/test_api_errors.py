"""Each bad input raises a clear error naming the problem: ValueError from the API, RuntimeError from the kernels."""

import pytest
import torch

from sigattn import sigmoid_attention, sigmoid_attention_varlen


def _qkv(B=2, N=8, H=4, H_kv=2, D=32, dtype=torch.float32):
    return torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, N, H_kv, D, dtype=dtype), \
        torch.randn(B, N, H_kv, D, dtype=dtype)


def _packed(T=10, H=4, H_kv=2, D=32):
    return torch.randn(T, H, D), torch.randn(T, H_kv, D), torch.randn(T, H_kv, D)


I32 = torch.int32


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v: (q[0], k, v), "padded layout needs 4-D q"),
    (lambda q, k, v: (q, k, v[:, :, :1]), "k and v shapes differ"),
    (lambda q, k, v: (q[:, :5], k, v), "differ in their leading"),
    (lambda q, k, v: (q, k.half(), v), "dtypes differ"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "unsupported dtype"),
    (lambda q, k, v: (q, k.to("meta"), v), "different devices"),
    (lambda q, k, v: (q[..., :16], k, v), "head dim of q"),
    (lambda q, k, v: (q.new_zeros(2, 8, 4, 300), k.new_zeros(2, 8, 2, 300), v.new_zeros(2, 8, 2, 300)),
     "head dim 300 unsupported"),
    (lambda q, k, v: (q[:, :, :3], k, v), r"multiple of k/v heads"),
])
def test_bad_qkv(mutate, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_attention(*mutate(*_qkv()))


@pytest.mark.parametrize("seq_lens,match", [
    (torch.tensor([8, 9], dtype=I32), r"seq_lens values must be in \[0, N=8\]"),
    (torch.tensor([-1, 3], dtype=I32), r"seq_lens values must be in \[0, N=8\]"),
    (torch.tensor([8, 3]), "seq_lens must be int32"),
    (torch.tensor([8], dtype=I32), "seq_lens has 1 entries for batch size 2"),
    (torch.tensor([[8, 3]], dtype=I32), "seq_lens must be 1-D"),
    ([8, 3], "seq_lens must be an int32 torch.Tensor"),
])
def test_bad_seq_lens(seq_lens, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_attention(*_qkv(), seq_lens=seq_lens)


@pytest.mark.parametrize("bias", ["log", True, [1.0]])
def test_bad_bias(bias):
    with pytest.raises(ValueError, match="bias must be 'log_n', a float or None"):
        sigmoid_attention(*_qkv(), bias=bias)


@pytest.mark.parametrize("cu,max_seqlen,match", [
    (torch.tensor([0, 6, 4, 10], dtype=I32), 6, "cu_seqlens must be non-decreasing"),
    (torch.tensor([1, 6, 10], dtype=I32), 6, r"cu_seqlens\[0\] must be 0"),
    (torch.tensor([0, 6, 9], dtype=I32), 6, r"cu_seqlens\[-1\] = 9 != total tokens T = 10"),
    (torch.tensor([0, 6, 10], dtype=I32), 5, "max_seqlen = 5 < longest sequence 6"),
    (torch.tensor([0, 6, 10]), 6, "cu_seqlens must be int32"),
    (torch.tensor([], dtype=I32), 6, "at least one entry"),
])
def test_bad_cu_seqlens(cu, max_seqlen, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_attention_varlen(*_packed(), cu, max_seqlen)


def test_varlen_bad_shapes():
    q, k, v = _packed()
    with pytest.raises(ValueError, match="varlen layout needs 3-D k"):
        sigmoid_attention_varlen(q, k[None], v, torch.tensor([0, 10], dtype=I32), 10)


# The kernels check values themselves (the API skips host reads under torch.compile): call the ops directly.
@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: torch.ops.sigattn.attn_fwd(q, k, v, torch.tensor([3, 9], dtype=I32), 1.0, 0.0, True, False),
     r"seq_lens\[1\] = 9 is outside \[0, N=8\]"),
    (lambda q, k, v: torch.ops.sigattn.attn_fwd(q, k, v, torch.tensor([3, 2]), 1.0, 0.0, True, False),
     "seq_lens must be int32"),
    (lambda q, k, v: torch.ops.sigattn.attn_fwd(q[:, :, :3], k, v, None, 1.0, 0.0, True, False),
     r"number of q heads \(3\) must be a multiple of k/v heads \(2\)"),
    (lambda q, k, v: torch.ops.sigattn.attn_bwd(q[:1], q, k, v, None, 1.0, 0.0, True, False),
     "grad_out shape"),
    (lambda q, k, v: torch.ops.sigattn.attn_varlen_fwd(q[0], k[0], v[0], torch.tensor([0, 5, 3, 8], dtype=I32), 8,
                                                       1.0, 0.0, True, False), "not non-decreasing at index 2"),
    (lambda q, k, v: torch.ops.sigattn.attn_varlen_fwd(q[0], k[0], v[0], torch.tensor([0, 8], dtype=I32), 4,
                                                       1.0, 0.0, True, False), "length 8 > max_seqlen = 4"),
    (lambda q, k, v: torch.ops.sigattn.attn_varlen_fwd(q[0], k[0], v[0], torch.tensor([0, 7], dtype=I32), 8,
                                                       1.0, 0.0, True, False), "!= total tokens T = 8"),
])
def test_kernel_checks(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(*_qkv())


@pytest.mark.parametrize("max_seqlen,match", [
    (torch.tensor(10, device="meta"), "max_seqlen must be a Python int .*meta tensor"),
    (torch.tensor([10, 10]), "max_seqlen must be a Python int"),
    (10.0, "max_seqlen must be a Python int, got float"),
    (True, "max_seqlen must be a Python int, got bool"),
    (-1, "max_seqlen must be ≥ 0"),
])
def test_bad_max_seqlen(max_seqlen, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_attention_varlen(*_packed(), torch.tensor([0, 6, 10], dtype=I32), max_seqlen)


def test_max_seqlen_accepts_integers():
    import numpy as np
    cu = torch.tensor([0, 6, 10], dtype=I32)
    ref = sigmoid_attention_varlen(*(t.clone() for t in _packed()), cu, 6)
    for m in (np.int64(6), torch.tensor(6)):
        assert sigmoid_attention_varlen(*_packed(), cu, m).shape == ref.shape


def _no_host_reads(monkeypatch):
    """Make any host read of an index tensor fail, as a GPU sync would under set_sync_debug_mode('error')."""
    def boom(*a, **k):
        raise AssertionError("host read of a device index tensor")
    for name in ("tolist", "item", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, boom)


def test_device_index_values_not_read_unless_checks_on(monkeypatch):
    """Non-CPU index tensors (meta here, CUDA in use) are never read on the host by default; input_checks() reads
    them. The values below are wrong on purpose: without checks the API passes them on unread."""
    from sigattn import input_checks
    q, k, v = (t.to("meta") for t in _packed())
    cu = torch.tensor([0, 6, 99], dtype=I32, device="meta")
    qp, kp, vp = (t.to("meta") for t in _qkv())
    sl = torch.tensor([3, 99], dtype=I32, device="meta")
    with monkeypatch.context() as m:
        _no_host_reads(m)
        assert sigmoid_attention_varlen(q, k, v, cu, 6).device.type == "meta"
        assert sigmoid_attention(qp, kp, vp, seq_lens=sl).device.type == "meta"
        with input_checks(), pytest.raises(AssertionError, match="host read"):
            sigmoid_attention_varlen(q, k, v, cu, 6)
        with input_checks(), pytest.raises(AssertionError, match="host read"):
            sigmoid_attention(qp, kp, vp, seq_lens=sl)
    with input_checks(False):   # CPU tensors are always checked (no GPU sync to avoid)
        with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
            sigmoid_attention_varlen(*_packed(), torch.tensor([0, 6, 4, 10], dtype=I32), 6)
