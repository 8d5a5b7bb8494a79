"""Device helpers shared by the Triton sigmoid-attention kernels.

Sequence addressing (one kernel family serves both layouts):
  padded  ``[B, N, H, D]``: sequence b starts at ``b·stride_b``, has ``L = seq_lens[b]`` (or N) valid rows
                            and N rows to write (rows ≥ L are written as 0);
  varlen  ``[T, H, D]``:   sequence b starts at token ``cu[b]``, has ``L = cu[b+1] − cu[b]`` rows, all written.

Sigmoid with scale and bias folded into one FMA on the raw score s = q·k:
  accurate: σ(scale·s + b) = 1 / (1 + 2^(c1·s + c0)),  c1 = −scale·log2 e, c0 = −b·log2 e
  fast:     same t, y = 1 + 2^min(t, 64), 1/y by a bit-trick seed and two Newton steps r ← r·(2 − y·r) on the
            FMA pipes: one MUFU op (ex2) per score instead of two (ex2 + rcp); relative error ≤ 3e-4 for every
            x (tested in tests/sigattn/test_triton_interpret.py and test_gpu_kernels.py), under bf16/fp16 rounding.
            (½ + ½·tanh.approx(x/2) was rejected: with the −log n bias p ≈ 1/n and 1 + tanh cancels, so its
            absolute error 2^-11 is a large relative error on every probability.)
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def seq_bounds(SeqInfo, b, N, stride_b, stride_t, VARLEN: tl.constexpr, HAS_LENS: tl.constexpr):
    """Return (base offset in elements, valid length L, rows to write) for sequence b."""
    if VARLEN:
        start = tl.load(SeqInfo + b)
        L = tl.load(SeqInfo + b + 1) - start
        base = start.to(tl.int64) * stride_t
        rows = L
    else:
        base = b.to(tl.int64) * stride_b
        if HAS_LENS:
            L = tl.minimum(tl.maximum(tl.load(SeqInfo + b), 0), N)
        else:
            L = N
        rows = N
    return base, L, rows


@triton.jit
def sigmoid_coeffs(scale, bias, L, LOG_N_BIAS: tl.constexpr, FAST_SIGMOID: tl.constexpr):
    """(c1, c0) with σ(scale·s + b) = 1/(1 + 2^(c1·s + c0)); b = bias − log(L) when LOG_N_BIAS."""
    b = bias
    if LOG_N_BIAS:
        b = b - tl.log(tl.maximum(L, 1).to(tl.float32))
    c1 = -scale * 1.4426950408889634
    c0 = -b * 1.4426950408889634
    return c1, c0


@triton.jit
def prob(t, FAST_SIGMOID: tl.constexpr):
    """σ from the folded argument t (see module docstring)."""
    if FAST_SIGMOID:
        y = 1.0 + tl.exp2(tl.minimum(t, 64.0))
        r = (0x7EF311C7 - y.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
        r = r * (2.0 - y * r)
        return r * (2.0 - y * r)
    else:
        return 1.0 / (1.0 + tl.exp2(t))


@triton.jit
def load_tile(ptr, rows, stride_t, offs_d, L, D: tl.constexpr, D_PAD: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [R, D_PAD] tile of rows ``rows`` (rows ≥ L and columns ≥ D read as 0)."""
    ptrs = ptr + rows[:, None] * stride_t + offs_d[None, :]
    if CHECK_ROWS:
        if D == D_PAD:
            return tl.load(ptrs, mask=rows[:, None] < L, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    else:
        if D == D_PAD:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def store_tile(ptr, val, rows, stride_t, offs_d, L, n_rows, D: tl.constexpr):
    """Store rows < n_rows of ``val``; rows ≥ L (padding) are written as exact zeros."""
    ptrs = ptr + rows[:, None] * stride_t + offs_d[None, :]
    val = tl.where(rows[:, None] < L, val, 0.0)
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D))


@triton.jit
def mm(a, b, DOT_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_FP32 computes in true fp32 (fp32 inputs, and bf16 under the interpreter)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sigmoid_kernel(X, Y, n, FAST_SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, prob(-x * 1.4426950408889634, FAST_SIGMOID), mask=offs < n)


def sigmoid_elementwise(x, fast: bool):
    """σ(x) (fp32 tensor) through the kernels' own sigmoid form, for accuracy tests of ``prob``."""
    y = x.new_empty(x.shape)
    _sigmoid_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), FAST_SIGMOID=fast, BLOCK=1024)
    return y
