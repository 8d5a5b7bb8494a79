"""FlopCounterMode counts the documented FLOPs: forward 4·H·D·Σ pairs (causal: L(L+1)/2 pairs), backward 2.5×."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sigattn import sigmoid_attention, sigmoid_attention_varlen


def _pairs(lens, causal):
    return sum(n * (n + 1) // 2 if causal else n * n for n in lens)


@pytest.mark.parametrize("causal", [False, True])
def test_flops_padded(causal):
    B, N, H, D = 3, 20, 4, 32
    lens = [20, 0, 7]
    q = torch.randn(B, N, H, D, requires_grad=True)
    k, v = torch.randn(B, N, 2, D), torch.randn(B, N, 2, D)
    with FlopCounterMode(display=False) as counter:
        sigmoid_attention(q, k, v, seq_lens=torch.tensor(lens, dtype=torch.int32), causal=causal).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    fwd = 4 * H * D * _pairs(lens, causal)
    assert counts[torch.ops.sigattn.attn_fwd] == fwd
    assert counts[torch.ops.sigattn.attn_bwd] == int(2.5 * fwd)
    with FlopCounterMode(display=False) as counter:
        sigmoid_attention(q, k, v)
    assert counter.get_total_flops() == 4 * H * D * B * N * N


def test_flops_varlen():
    lens, H, D = [5, 0, 12], 2, 64
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    q = torch.randn(17, H, D, requires_grad=True)
    k, v = torch.randn(17, 1, D), torch.randn(17, 1, D)
    with FlopCounterMode(display=False) as counter:
        sigmoid_attention_varlen(q, k, v, cu, 12).sum().backward()
    fwd = 4 * H * D * _pairs(lens, False)
    assert counter.get_total_flops() == fwd + int(2.5 * fwd)
