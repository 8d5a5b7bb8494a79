"""Triton kernels on CPU under TRITON_INTERPRET=1, forward + all gradients vs a float64 reference.

TRITON_INTERPRET must be set before triton is imported, and other tests import triton normally, so each case runs
in a child process (this file run as a script). Interpreter notes: ``tl.dot`` on bf16 is wrong under the
interpreter (triton-lang/triton#11584), so the kernels compute their dots in fp32 when interpreting (a constexpr
flag); the bf16 case therefore checks the masking/indexing/rounding path, not bf16 tensor-core numerics.
bf16/fp16 use the fast sigmoid (ex2 + Newton reciprocal); its elementwise bound is checked here too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# name: (layout, dtype, B or lens, N, H, H_kv, D, causal, bias mode, deterministic)
CASES = {
    "padded_n17_lens": dict(layout="padded", dtype="float32", lens=[17, 5], N=17, H=2, Hkv=2, D=32,
                            causal=False, bias="log_n", det=False),
    "padded_n1_nolens": dict(layout="padded", dtype="float32", lens=None, B=2, N=1, H=1, Hkv=1, D=64,
                             causal=False, bias="log_n", det=False),
    "padded_gqa_causal_allpad": dict(layout="padded", dtype="float32", lens=[0, 19, 7], N=19, H=4, Hkv=1, D=64,
                                     causal=True, bias=None, det=False),
    "varlen_gqa_causal_d96": dict(layout="varlen", dtype="float32", lens=[1, 17, 0, 9], H=4, Hkv=2, D=96,
                                  causal=True, bias=0.7, det=False),
    "varlen_bf16_det": dict(layout="varlen", dtype="bfloat16", lens=[23, 2], H=2, Hkv=1, D=32,
                            causal=False, bias="log_n", det=True),
    "padded_det_len1_allpad": dict(layout="padded", dtype="bfloat16", lens=[1, 0, 17], N=17, H=2, Hkv=1, D=32,
                                   causal=False, bias="log_n", det=True),
}
# det=True cases run in torch's deterministic mode with ``fill_uninitialized_memory``: every torch.empty the kernels'
# launchers allocate reads NaN, so a row a kernel leaves unwritten fails the finite / padding-zero checks for sure
# (not only when leftover memory happens to differ from the answer).


def _reference(q, k, v, lens, scale, bias, causal):
    """float64 math: out_i = Σ_{j<L, j≤i if causal} σ(scale·q_i·k_j + b)·v_j per sequence; zeros at padding."""
    import math

    import torch

    out = torch.zeros_like(q)
    group = q.shape[-2] // k.shape[-2]
    for bi, L in enumerate(lens):
        if L == 0:
            continue
        qb, kb, vb = q[bi, :L], k[bi, :L].repeat_interleave(group, 1), v[bi, :L].repeat_interleave(group, 1)
        b = (0.0 if bias is None else (-math.log(L) if bias == "log_n" else bias))
        s = torch.einsum("ihd,jhd->hij", qb, kb) * scale + b
        p = torch.sigmoid(s)
        if causal:
            p = p * torch.ones(L, L, dtype=p.dtype).tril()
        out[bi, :L] = torch.einsum("hij,jhd->ihd", p, vb)
    return out


def _child(name: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from sigattn.triton_bwd import launch_bwd
    from sigattn.triton_fwd import launch_fwd

    c = CASES[name]
    if c["det"]:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.empty(4).isnan().all()                            # the fill is on
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    dtype = getattr(torch, c["dtype"])
    D, H, Hkv = c["D"], c["H"], c["Hkv"]
    if c["layout"] == "padded":
        N = c["N"]
        B = len(c["lens"]) if c["lens"] is not None else c["B"]
        lens = c["lens"] if c["lens"] is not None else [N] * B
        shape_q, shape_kv = (B, N, H, D), (B, N, Hkv, D)
    else:
        lens = c["lens"]
        N = max(lens)
        T = sum(lens)
        shape_q, shape_kv = (T, H, D), (T, Hkv, D)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_kv, generator=g).to(dtype)
    v = torch.randn(shape_kv, generator=g).to(dtype)
    do = torch.randn(shape_q, generator=g).to(dtype)
    scale = D ** -0.5
    bias = c["bias"]
    fbias = 0.0 if bias in (None, "log_n") else float(bias)
    kw = dict(scale=scale, bias=fbias, log_n_bias=bias == "log_n", causal=c["causal"])
    if c["layout"] == "padded":
        info = torch.tensor(lens, dtype=torch.int32) if c["lens"] is not None else None
        out = launch_fwd(q, k, v, info, varlen=False, max_seqlen=N, **kw)
        dq, dk, dv = launch_bwd(do, q, k, v, info, varlen=False, max_seqlen=N, deterministic=c["det"], **kw)
        pad = lambda t: t  # noqa: E731
        unpad = lambda t: t  # noqa: E731
    else:
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
        out = launch_fwd(q, k, v, cu, varlen=True, max_seqlen=N, **kw)
        dq, dk, dv = launch_bwd(do, q, k, v, cu, varlen=True, max_seqlen=N, deterministic=c["det"], **kw)

        def pad(t):
            res = t.new_zeros(len(lens), N, *t.shape[1:])
            for i, L in enumerate(lens):
                res[i, :L] = t[cu[i]:cu[i + 1]]
            return res

        def unpad(t):
            return torch.cat([t[i, :L] for i, L in enumerate(lens)])

    q64, k64, v64, do64 = (pad(t).double().requires_grad_() for t in (q, k, v, do))
    ref = _reference(q64, k64, v64, lens, scale, bias, c["causal"])
    ref.backward(do64.detach())
    res = {}
    for nm, got, want in (("out", out, ref.detach()), ("dq", dq, q64.grad), ("dk", dk, k64.grad),
                          ("dv", dv, v64.grad)):
        want = unpad(want)
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()
        res[nm] = err
        if c["layout"] == "padded":
            for i, L in enumerate(lens):
                res[nm + "_pad_nonzero"] = res.get(nm + "_pad_nonzero", 0) + int(got[i, L:].count_nonzero())
    res["finite"] = all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv))
    return res


def _sigmoid_child() -> dict:
    """Max relative error of both in-kernel sigmoid forms vs float64 on x ∈ [−40, 60] (+ extremes); abs below."""
    import torch

    sys.path.insert(0, str(ROOT))
    from sigattn.triton_common import sigmoid_elementwise

    x = torch.cat([torch.linspace(-60, 60, 20001), torch.tensor([-1e30, -200.0, 200.0, 1e30, 0.0])])
    res = {}
    for fast in (False, True):
        y = sigmoid_elementwise(x, fast)
        want = torch.sigmoid(x.double())
        err = (y.double() - want).abs()
        body = x >= -40  # relative error where σ > 4e-18; below that (2^t clamped) absolute error
        res["fast" if fast else "accurate"] = (err[body] / want[body]).max().item()
        res["tail_abs_" + str(fast)] = err[~body].max().item()
        res["finite_" + str(fast)] = bool(torch.isfinite(y).all())
    return res


def test_triton_interpreter_sigmoid_bound():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "sigmoid"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["finite_True"] and res["finite_False"], res
    assert res["accurate"] < 1e-5, res
    assert res["tail_abs_True"] < 1e-17 and res["tail_abs_False"] < 1e-17, res
    assert res["fast"] < 3e-4, res


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter(name):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    tol = 2e-2 if CASES[name]["dtype"] == "bfloat16" else 1e-5
    assert res["finite"], res
    for nm in ("out", "dq", "dk", "dv"):
        assert res[nm] < tol, (nm, res)
        assert res.get(nm + "_pad_nonzero", 0) == 0, (nm, res)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    print(json.dumps(_sigmoid_child() if sys.argv[1] == "sigmoid" else _child(sys.argv[1])))


def test_dq_tma_plumbing_on_cpu(monkeypatch):
    # The TMA-reduce dQ path runs on sm90+ only (tests/sigattn/test_gpu_kernels.py); here: its switch stays off on
    # the CPU, every autotune config carries the descriptor hook, and the hook sizes the block per config.
    import torch

    from sigattn import triton_bwd, triton_tuning

    q = torch.randn(3, 2, 64)
    assert not triton_bwd.dq_tma_usable(q, 64)
    # default: TMA reductions for varlen calls only (where they measured faster); the variable overrides both
    monkeypatch.delenv("SIGATTN_DQ_TMA", raising=False)
    assert triton_tuning.dq_tma(True) and not triton_tuning.dq_tma(False)
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("SIGATTN_DQ_TMA", value)
        assert triton_tuning.dq_tma(True) is want and triton_tuning.dq_tma(False) is want
    hooked = triton_tuning.with_pre_hook(triton_tuning.BWD_CONFIGS, triton_bwd._dq_block)
    for cls, cfgs in triton_tuning.BWD_CONFIGS.items():
        assert [(c.kwargs, c.num_warps, c.num_stages) for c in hooked[cls]] == [
            (c.kwargs, c.num_warps, c.num_stages) for c in cfgs]
        assert all(c.pre_hook is triton_bwd._dq_block for c in hooked[cls]) and all(c.pre_hook is None for c in cfgs)
    assert "DQ_TMA" in triton_bwd._kv_autotuned.keys and "DQ_TMA" not in triton_bwd._dq_autotuned.keys

    class Desc:
        block_shape = [16, 64]

    d = Desc()
    triton_bwd._dq_block({"DQd": d, "BLOCK_M": 32, "D": 128})
    assert d.block_shape == [32, 128]
    triton_bwd._dq_block({"DQd": None, "BLOCK_M": 32, "D": 128})      # the atomics path: nothing to size
