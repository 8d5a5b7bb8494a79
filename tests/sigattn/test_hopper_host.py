"""Host side of the Gluon Hopper forward, on the CPU: the check-free TMA descriptors equal Triton's checked ones."""

import pytest
import torch

from sigattn import hopper_fwd

pytestmark = pytest.mark.skipif(not hopper_fwd.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("varlen", [True, False])
@pytest.mark.parametrize("D", sorted(hopper_fwd.CONFIGS))
def test_fast_descriptor_equals_checked_constructor(dtype, varlen, D):
    H, rows = 3, 37                                          # odd sizes: shape/strides must carry through as is
    shape = (rows, H, D) if varlen else (2, rows, H, D)
    qkv = torch.randn(*shape[:-2], 3 * H, D, dtype=dtype)    # a fused QKV buffer: strided q view
    q = qkv[..., :H, :]
    t2d = hopper_fwd._as_2d(q, varlen)
    BM, BN = hopper_fwd.CONFIGS[D][:2]
    for block in ((BM, D), (BN, D)):
        fast = hopper_fwd._desc(t2d, block)
        layout = hopper_fwd.gl.NVMMASharedLayout.get_default_for(list(block), hopper_fwd.gl.bfloat16
                                                                 if dtype == torch.bfloat16 else hopper_fwd.gl.float16)
        checked = hopper_fwd.TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), list(block), layout)
        assert fast == checked
        assert fast.strides[0] == 3 * H * D and fast.shape[0] == (rows if varlen else 2 * rows)


def test_fp32_dq_descriptor_equals_checked_constructor():
    # the backward's TMA-reduction target: the [H·(tokens + 64), D] fp32 dQ buffer, one 64-column piece per box
    buf = torch.zeros(3 * (37 + 64), 128, dtype=torch.float32)
    fast = hopper_fwd._desc(buf, (64, 64))
    layout = hopper_fwd.gl.NVMMASharedLayout.get_default_for([64, 64], hopper_fwd.gl.float32)
    assert fast == hopper_fwd.TensorDescriptor(buf, list(buf.shape), list(buf.stride()), [64, 64], layout)


@pytest.mark.parametrize("env, det, want", [(None, False, "default"), ("0", False, False), ("1", False, True),
                                            ("tma", False, "tma"), ("TMA", False, "tma"), ("tma", True, False)])
def test_hopper_dq_variant_from_environment(env, det, want, monkeypatch):
    from sigattn import triton_tuning

    if env is None:
        monkeypatch.delenv("SIGATTN_HOPPER_DQ_ATOMIC", raising=False)
    else:
        monkeypatch.setenv("SIGATTN_HOPPER_DQ_ATOMIC", env)
    monkeypatch.setenv("SIGATTN_DETERMINISTIC", "1" if det else "0")
    assert triton_tuning.hopper_dq_atomic("default") == want
