"""torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) on all four sigattn:: ops."""

import pytest
import torch

import sigattn  # noqa: F401  (registers the ops)

I32 = torch.int32


def _t(*shape, grad=False):
    return torch.randn(*shape, requires_grad=grad)


def _padded(grad):
    return (_t(2, 7, 4, 16, grad=grad), _t(2, 7, 2, 16, grad=grad), _t(2, 7, 2, 16, grad=grad))


def _varlen(grad):
    return (_t(10, 4, 16, grad=grad), _t(10, 2, 16, grad=grad), _t(10, 2, 16, grad=grad))


CU = torch.tensor([0, 3, 3, 10], dtype=I32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_lens", [None, torch.tensor([7, 2], dtype=I32)], ids=["all-valid", "padded"])
def test_opcheck_padded(causal, seq_lens):
    q, k, v = _padded(grad=True)
    torch.library.opcheck(torch.ops.sigattn.attn_fwd.default, (q, k, v, seq_lens, 0.25, 0.1, True, causal))
    torch.library.opcheck(torch.ops.sigattn.attn_bwd.default,
                          (_t(2, 7, 4, 16), *_padded(grad=False), seq_lens, 0.25, 0.1, True, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen(causal):
    q, k, v = _varlen(grad=True)
    torch.library.opcheck(torch.ops.sigattn.attn_varlen_fwd.default, (q, k, v, CU, 7, 0.25, 0.0, False, causal))
    torch.library.opcheck(torch.ops.sigattn.attn_varlen_bwd.default,
                          (_t(10, 4, 16), *_varlen(grad=False), CU, 7, 0.25, 0.0, False, causal))
