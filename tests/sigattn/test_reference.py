"""The float64 reference against a scalar-loop transcription of the formula, on tiny random shapes."""

import math

import pytest
import torch

from sigattn.reference import sigmoid_attention_ref, sigmoid_attention_varlen_ref


def _loops(q, k, v, lens, scale, bias, causal):
    B, N, H, D = q.shape
    group = H // k.shape[2]
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    for b in range(B):
        n = lens[b]
        for h in range(H):
            for i in range(n):
                for j in range(n):
                    if causal and j > i:
                        continue
                    bb = -math.log(n) if bias == "log_n" else (bias or 0.0)
                    s = scale * float(q[b, i, h] @ k[b, j, h // group]) + bb
                    out[b, i, h] += v[b, j, h // group] / (1 + math.exp(-s))
    return out


@pytest.mark.parametrize("bias,causal", [("log_n", False), (0.3, True), (None, False)])
def test_reference_matches_loops(bias, causal):
    q = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    k = torch.randn(3, 6, 2, 5, dtype=torch.float64)
    v = torch.randn(3, 6, 2, 5, dtype=torch.float64)
    lens = [6, 0, 4]
    ref = sigmoid_attention_ref(q, k, v, torch.tensor(lens), scale=0.4, bias=bias, causal=causal)
    torch.testing.assert_close(ref, _loops(q, k, v, lens, 0.4, bias, causal))
    cu = torch.tensor([0, 6, 6, 10])
    pack = lambda x: torch.cat([x[0, :6], x[2, :4]])  # noqa: E731
    var = sigmoid_attention_varlen_ref(pack(q), pack(k), pack(v), cu, scale=0.4, bias=bias, causal=causal)
    torch.testing.assert_close(var, pack(ref))


def test_reference_default_scale_and_dtype():
    q, k, v = (torch.randn(1, 4, 1, 16) for _ in range(3))
    ref = sigmoid_attention_ref(q, k, v)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, sigmoid_attention_ref(q, k, v, scale=0.25))
