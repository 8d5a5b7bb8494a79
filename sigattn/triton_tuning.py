"""Launch configurations for the Triton kernels: a bounded autotune set per head-dim tile, or one fixed config.

Environment switches (read at call time):
  SIGATTN_NO_AUTOTUNE=1    use the fixed config below (no first-call tuning cost).
  SIGATTN_FAST_SIGMOID=0   use 1/(1+2^t) with a MUFU reciprocal instead of the Newton reciprocal (bf16/fp16 only
                           use the fast form; see triton_common).
  SIGATTN_HOPPER_DQ_ATOMIC=1|tma|0  the opt-in Hopper backward's dQ: vector or TMA reductions, or its own kernel.
  SIGATTN_DQ_TMA=1|0       the portable backward adds dQ by TMA reductions (sm90+; see triton_bwd) or by atomics;
                           unset: TMA reductions for varlen (packed) calls, atomics for padded ones (H200, bf16,
                           session 18: varlen +1–3 % at D = 128, +2–9 % at D = 64; padded −3–5 % at D = 128).
  SIGATTN_DETERMINISTIC=1  backward computes dQ in its own Q-parallel pass (no fp32 atomics, bitwise reproducible);
                           also on when ``torch.are_deterministic_algorithms_enabled()``.
Autotune results are cached in-process per key (head-dim tile, dtype, causal, power-of-two bucket of the
sequence length) and on disk by Triton where the installed version supports ``cache_results``.
"""

import inspect
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "", "false", "no")


def no_autotune() -> bool:
    return INTERPRET or _flag("SIGATTN_NO_AUTOTUNE")


def fast_sigmoid(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and _flag("SIGATTN_FAST_SIGMOID", "1")


def deterministic() -> bool:
    return _flag("SIGATTN_DETERMINISTIC") or torch.are_deterministic_algorithms_enabled()


def dq_tma(varlen: bool) -> bool:
    """dQ by TMA reductions in the portable backward: ``SIGATTN_DQ_TMA`` if set, else for varlen calls only."""
    return _flag("SIGATTN_DQ_TMA", "1" if varlen else "0")


def hopper_dq_atomic(default) -> bool | str:
    """The Hopper backward's dQ variant (``hopper_bwd.launch_bwd(dq_atomic=…)``) from ``SIGATTN_HOPPER_DQ_ATOMIC``:
    ``tma`` (TMA reductions), another true value (vector reductions) or false (its own dQ kernel, the only one in
    deterministic mode)."""
    if deterministic():
        return False
    mode = os.environ.get("SIGATTN_HOPPER_DQ_ATOMIC", "").strip().lower()
    if not mode:
        return default
    return "tma" if mode == "tma" else _flag("SIGATTN_HOPPER_DQ_ATOMIC")


def seq_bucket(n: int) -> int:
    """Autotune key for the sequence length: next power of two, clamped to [64, 16384]."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), 64), 16384)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages). Forward: q tile BLOCK_M, k/v tiles BLOCK_N (BLOCK_M % BLOCK_N == 0).
FWD_CONFIGS = {
    "small": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 4)],
    "large": [_cfg(64, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(32, 32, 4, 2)],
}
# Backward K/V-parallel: k/v tile BLOCK_N, q tiles BLOCK_M (BLOCK_N % BLOCK_M == 0).
# At D = 128 every tile hits 255 registers; (64, 64, 8 warps) and (32, 64, 8 warps) spill least (8–72 B of stack
# against 272–584 B for (64, 128, 8 warps); benchmarks/results/portable_bwd_sm90_compile.txt), so autotuning times them.
BWD_CONFIGS = {
    "small": [_cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3), _cfg(32, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(16, 128, 4, 3),
              _cfg(64, 64, 8, 3), _cfg(32, 64, 8, 3)],
    "large": [_cfg(16, 32, 8, 2), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2)],
}
# dQ-only pass (deterministic mode): q tile BLOCK_M, k/v tiles BLOCK_N (BLOCK_M % BLOCK_N == 0).
DQ_CONFIGS = {
    "small": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 3)],
    "large": [_cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2), _cfg(64, 16, 4, 2)],
}
FIXED = {
    ("fwd", "small"): _cfg(128, 64, 8, 3),
    ("fwd", "large"): _cfg(64, 32, 8, 2),
    ("bwd", "small"): _cfg(32, 128, 4, 3),
    ("bwd", "large"): _cfg(16, 32, 8, 2),
    ("dq", "small"): _cfg(64, 64, 4, 3),
    ("dq", "large"): _cfg(32, 32, 8, 2),
}
# Backward at head dim 128: (32, 128, 4 warps) holds two 128×128 fp32 accumulators in 128 threads and spills —
# 110-117 TFLOP/s vs 339-406 for this one, which is also what autotuning picks (H200, N=1024/4096,
# benchmarks/results/attention_fixed_bwd_d128_h200.json).
FIXED_BWD_D128 = _cfg(64, 128, 8, 3)
INTERPRET_CFG = _cfg(16, 16, 1, 1)


def with_pre_hook(table: dict, hook) -> dict:
    """``table`` with ``hook`` as every config's pre-hook (called with the launch's arguments before it)."""
    return {k: [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook)
                for c in cfgs] for k, cfgs in table.items()}


def size_class(d_pad: int) -> str:
    return "large" if d_pad > 128 else "small"


def _prune_for(table):
    def prune(configs, named_args, **kwargs):
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        return table[size_class(d_pad)]

    return prune


KEY = ("D_PAD", "CAUSAL", "VARLEN", "HAS_LENS", "seq_bucket", "GROUP", "FAST_SIGMOID", "DOT_FP32", "DQ_TMA")


def autotuned(kernel, table, reset_to_zero=None):
    """Wrap a jit kernel in ``triton.autotune`` over the size class's configs for its D_PAD."""
    all_cfgs = table["small"] + table["large"]
    kw = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kw["cache_results"] = True
    return triton.autotune(
        configs=all_cfgs,
        key=[k for k in KEY if k in kernel.arg_names],
        prune_configs_by={"early_config_prune": _prune_for(table)},
        reset_to_zero=reset_to_zero,
        **kw,
    )(kernel)


# fp32 inputs (exact fp32 dots on the FMA pipes, a correctness path, never autotuned): small unpipelined tiles,
# since fp32 tiles take twice the shared memory of bf16 ones.
FIXED_FP32 = {"fwd": _cfg(64, 32, 4, 1), "bwd": _cfg(16, 32, 4, 1), "dq": _cfg(32, 32, 4, 1)}


def fixed(kind: str, d_pad: int, fp32: bool = False) -> triton.Config:
    """The fixed config for a kernel kind ("fwd", "bwd", "dq") and head-dim tile."""
    if INTERPRET:
        return INTERPRET_CFG
    if fp32:
        return FIXED_FP32[kind]
    return FIXED_BWD_D128 if (kind == "bwd" and d_pad == 128) else FIXED[(kind, size_class(d_pad))]
