"""torch.autograd.gradcheck of the C++ CPU kernels (float64, tiny shapes), padded and varlen, causal and not."""

import pytest
import torch

from sigattn import sigmoid_attention, sigmoid_attention_varlen


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", ["log_n", -0.5])
def test_gradcheck_padded(causal, bias):
    q, k, v = _leaf(3, 5, 2, 8), _leaf(3, 5, 1, 8), _leaf(3, 5, 1, 8)
    lens = torch.tensor([5, 0, 3], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sigmoid_attention(q, k, v, seq_lens=lens, bias=bias, causal=causal), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_varlen(causal):
    q, k, v = _leaf(9, 4, 8), _leaf(9, 2, 8), _leaf(9, 2, 8)
    cu = torch.tensor([0, 4, 4, 5, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sigmoid_attention_varlen(q, k, v, cu, 4, scale=0.3, causal=causal), (q, k, v))
