"""The public API never reads a device tensor on the host (skipped without CUDA).

Under ``torch.cuda.set_sync_debug_mode("error")`` any synchronising CUDA call (a D2H read such as ``.tolist()``,
``.item()``, ``int(t)``) raises. Forward and backward of both layouts run under it once the kernels are compiled
(autotuning benchmarks, which syncs, happens on the warm-up call); ``input_checks()`` — the debugging switch that
reads the index tensors — is shown to sync, so the test can fail.
"""

import pytest
import torch

import sigattn

pytestmark = pytest.mark.gpu
I32 = torch.int32


@pytest.fixture
def sync_errors():
    """Tests switch the mode to "error" themselves once their inputs are on the GPU: building inputs copies host
    tensors to the device, which the debug mode counts as synchronising."""
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _varlen_inputs(lengths, H=4, H_kv=2, D=64):
    cu = torch.zeros(len(lengths) + 1, dtype=I32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    T = int(cu[-1])
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(T, H_kv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    return q, k, v, cu.cuda(), max(lengths)


def _run_varlen(q, k, v, cu, max_seqlen):
    out = sigattn.sigmoid_attention_varlen(q, k, v, cu, max_seqlen)
    out.backward(torch.ones_like(out))
    return out


def _run_padded(q, k, v, seq_lens):
    out = sigattn.sigmoid_attention(q, k, v, seq_lens=seq_lens)
    out.backward(torch.ones_like(out))
    return out


def test_varlen_forward_backward_without_host_sync(sync_errors):
    args = _varlen_inputs([17, 1, 300, 64])
    _run_varlen(*args)                                  # compile/autotune outside the checked region
    torch.cuda.set_sync_debug_mode("error")
    out = _run_varlen(*args)
    assert out.shape == args[0].shape
    with sigattn.input_checks(), pytest.raises(RuntimeError, match="synchroniz"):
        _run_varlen(*args)


def test_padded_forward_backward_without_host_sync(sync_errors):
    B, N, H, D = 3, 257, 4, 64
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    seq_lens = torch.tensor([257, 17, 0], dtype=I32, device="cuda")
    _run_padded(q, k, v, seq_lens)
    torch.cuda.set_sync_debug_mode("error")
    out = _run_padded(q, k, v, seq_lens)
    assert out.shape == q.shape
    with sigattn.input_checks(), pytest.raises(RuntimeError, match="synchroniz"):
        _run_padded(q, k, v, seq_lens)


def test_input_checks_catch_bad_cuda_lengths():
    q, k, v, cu, _ = _varlen_inputs([5, 7])
    with sigattn.input_checks(), pytest.raises(ValueError, match="max_seqlen = 6 < longest sequence 7"):
        sigattn.sigmoid_attention_varlen(q, k, v, cu, 6)
    with pytest.raises(ValueError, match="max_seqlen must be a Python int .*cuda tensor"):
        sigattn.sigmoid_attention_varlen(q, k, v, cu, torch.tensor(7, device="cuda"))
