"""Hopper (sm90) backward in Gluon — opt-in (``SIGATTN_HOPPER_BWD=1``): 0.94–1.09× the portable backward (H200).

With P = σ(scale·QKᵀ + b), dP = dO·Vᵀ, dS = P∘(1−P)∘dP (sigmoid needs no rowsum(dO∘O) pass):
    dV = Pᵀ·dO,   dK = scale·dSᵀ·Q,   dQ = scale·dS·K.

Three dQ variants (``launch_bwd(dq_atomic=…)``, default ``DQ_ATOMIC``):
  dQ kernel (7 GEMMs per tile pair, deterministic, no atomics — the portable backward's deterministic split):
    ``hopper_bwd_kv_kernel``, grid (key tiles, B·H_kv): a CTA holds one 128-key K/V tile in shared memory and walks
      the GQA group's query heads and their 64-row query tiles (Q, dO by TMA, double-buffered: tile i+1 loads while
      tile i computes): Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (both async), Pᵀ and dSᵀ in registers, then dV += Pᵀ·dO and
      dK += dSᵀ·Q with Pᵀ/dSᵀ as the register A operand; 4 GEMMs.
    ``hopper_bwd_q_kernel``, grid (query tiles, B·H): a CTA holds a 128-row Q and dO tile and walks the key tiles
      (K, V double-buffered): S = Q·Kᵀ, dP = dO·Vᵀ, dQ += dS·K; 3 GEMMs.
  dQ by atomics (5 GEMMs, one kernel, not bitwise reproducible): the K/V kernel puts Pᵀ and dSᵀ in shared memory
    (dV, dK as shared-memory GEMMs) and adds dQ = dS·K ([64, D], fp32, dS read transposed from dSᵀ's shared memory,
    in 64-column pieces of D to stay within the registers) into a head-major [H, tokens + 64, D] buffer with relaxed
    vector reductions ``red.global.add.v2.f32`` (two adjacent columns per instruction; per-thread offsets are
    constants; no mask: query rows past L are exact zeros, so the spare rows and the next cell's rows get + 0.0);
    key rows past L are masked out of dSᵀ and,
    in the padded layout, zeroed in K. Each key tile starts its query walk at another tile (rotation) so the CTAs of
    one cell do not add into the same rows at once. dQ = scale·buffer, cast, in one elementwise pass.
    ``dq_atomic="tma"``: the same kernel hands each [64, 64] piece of scale·dQ to the TMA unit instead
    (registers → a swizzled shared-memory slot → ``cp.reduce.async.bulk.tensor … .add``, asynchronous: the slot is
    waited for only one step later), so the adds leave the SM's load/store path; the final pass only casts.
σ/dS overlap the tensor cores within each warpgroup (``OVERLAP``); no warp specialisation or ping-pong yet.
Masking: P's query columns ≥ L (kv kernel) and, in the boundary key tile only, dS's key columns ≥ L (q kernel) are
set to 0 with ``where`` (a product would keep NaN from padding; in the kv kernel dSᵀ = (Pᵀ − Pᵀ²)·dPᵀ is then 0
where Pᵀ is, dPᵀ being finite there; a boundary-only branch there cost 20 registers); in the padded layout the tail rows
of a partial Q/dO tile (kv kernel) or K tile (q kernel) are zeroed in shared memory before they enter a GEMM as
the B operand, since 0·NaN is NaN. Rows of dQ/dK/dV past L are written as 0 (padded) or not at all (varlen).
"""

import functools

import torch
import triton

from . import hopper_fwd
from .hopper_fwd import HAVE_GLUON, _as_2d, _desc

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)

    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin

    from .hopper_fwd import _coeffs, _prob, _seq

# (BLOCK_M, BLOCK_N) of the kv kernel (BLOCK_N keys held, BLOCK_M queries streamed) and of the q kernel (BLOCK_M
# queries held, BLOCK_N keys streamed); 8 warps = 2 warpgroups × 64 rows of the held tile. 128-row query tiles in the
# kv kernel at D = 64 (session 16, H200): 5-GEMM TMA +3–5 % (still 0.92–0.96× the portable backward), 7-GEMM −3–6 %.
KV_BLOCKS = (64, 128)
Q_BLOCKS = (128, 64)
# dQ by atomics from the K/V kernel (5 GEMMs) instead of the dQ kernel (7): off, measured slower (H200: 0.81–0.86×
# the portable backward; its probe without σ/dS tops out at 387 TFLOP/s: scalar fp32 atomics, 32 per thread per
# tile pair) (sm90 build, D = 128: 246–248 registers, no spills, dQᵀ in two 64-row halves)
DQ_ATOMIC = False
# How the 7-GEMM kernels overlap σ/dS (CUDA cores) with the tensor cores within a warpgroup: 0 none (wait for every
# GEMM); 1 σ under dPᵀ's GEMM, dSᵀ under dV's (kv kernel), σ under dP's (q kernel); 2 also dK's / dQ's GEMM runs on
# into the next step (its buffer refilled once the next step's first GEMM is done)
OVERLAP = 2
# _prob's form in the backward (``launch_bwd(sig=…)``): SIG 0 (ex2 + two Newton steps, rel. error 7e-6); SIG 2
# (ex2 + rcp.approx, ~1 ulp: more accurate, one more MUFU op, fewer FMA-pipe ops) timed no faster (session 13); SIG 1/3
# (rel. error 1.3e-4) are out: dS = P(1−P)·dP would lose P's error where P ≈ 1
SIG_BWD = 0
# dq_atomic="tma": 1 = each dQ piece's GEMM, then its trip through shared memory to the TMA unit, in turn; 2 = dQ's
# GEMMs issued before dV's and dK's, each piece stored while the GEMMs behind it run ("tma1"/"tma2" pick one). H200,
# D = 128 (session 14): form 2 331–407 TFLOP/s, 1.5–2 % over form 1 and 1.13–1.19× the red.v2 variant; 0.93–0.97× the
# portable backward padded, 0.99–1.01× varlen: not ahead, so DQ_ATOMIC stays off. A form 3 (session 15, commits
# bdbafd0/2c02250, removed) issued step i+1's Sᵀ/dPᵀ right behind step i's GEMMs, before dQ's pieces were staged:
# 0.88–0.91× form 2 with two Q/dO buffers (the next tiles' load then has only the σ/dS phase to land), 0.82–0.85×
# with three (one dQ slot; 224–240 B of spills at 255 registers)
DQ_TMA = 2


def _tma_form(dq_atomic) -> int:
    """The TMA form for a ``dq_atomic`` value: ``"tma"`` → ``DQ_TMA``, ``"tma1"``/``"tma2"`` → that form, else 0."""
    return {"tma": DQ_TMA, "tma1": 1, "tma2": 2}.get(dq_atomic, 0) if isinstance(dq_atomic, str) else 0


def supported(do, q, k, v, causal: bool) -> bool:
    """Whether this backward can take the call (host-side checks only): the forward's conditions, for dO too."""
    return hopper_fwd.supported(q, k, v, causal) and hopper_fwd.supported(do, k, v, causal) and do.shape == q.shape


if HAVE_GLUON:

    @gluon.jit
    def _zero_tail(tile, row0_in_seq, L, ROWS: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
        """Zero the rows of a shared-memory tile whose position in the sequence is ≥ L (padding may hold NaN)."""
        TPW_N: gl.constexpr = D // 8
        io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
        t = tile.load(io)
        tile.store(gl.where((row0_in_seq + rows)[:, None] < L, t, 0.0))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _load_pair(a_desc, b_desc, a_smem, b_smem, bar, row, col):
        """TMA-load the [row, col] boxes of two same-shape tensors (Q and dO, or K and V) into ``bar``'s buffers."""
        mbarrier.expect(bar, 2 * a_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [row, col], bar, a_smem)
        tma.async_copy_global_to_shared(b_desc, [row, col], bar, b_smem)

    @gluon.jit
    def _load_step(a_desc, b_desc, a_smem, b_smem, ld_bar, t, row, col, NS: gl.constexpr):
        """Step ``t``'s two tiles into slot t mod NS of a ring of NS buffer pairs, each slot with its own barrier."""
        _load_pair(a_desc, b_desc, a_smem.index(t % NS), b_smem.index(t % NS), ld_bar.index(t % NS), row, col)

    @gluon.jit
    def _load_walk_step(q_desc, do_desc, q_smem, do_smem, ld_bar, t, rot, total, n_m, row0, hk, GROUP,
                        NS: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr):
        """The kv kernel's walk: step t takes item (t + rot) mod total, i.e. query head hk·GROUP + item // n_m and
        query tile item % n_m; its Q and dO tiles go to ring slot t mod NS."""
        item = (t + rot) % total
        _load_step(q_desc, do_desc, q_smem, do_smem, ld_bar, t, row0 + (item % n_m) * BLOCK_M,
                   (hk * GROUP + item // n_m) * D, NS)

    @gluon.jit
    def _red_add_v2(ptrs, vals):
        """``*ptrs += vals`` by relaxed vector reductions of two fp32 each (sm90 ``red.global.add.v2.f32``; Triton's
        ``atomic_add`` issues one scalar atomic per element). Pairs are consecutive elements of a thread (the wgmma
        accumulator layout: adjacent columns), so ``ptrs`` must be contiguous and 8-byte aligned within a pair."""
        gl.inline_asm_elementwise("red.relaxed.gpu.global.add.v2.f32 [$2], {$4, $5}; mov.b32 $0, 0; mov.b32 $1, 0;",
                                  "=r,=r,l,l,f,f", [ptrs.to(gl.int64, bitcast=True), vals], dtype=gl.int32,
                                  is_pure=False, pack=2)

    @_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """``global[box at coord] += src`` (shared memory) by one asynchronous TMA reduction (sm90
        ``cp.reduce.async.bulk.tensor … .add``), issued by one thread and committed as a bulk group: ``tma.store_wait``
        says when ``src`` may be overwritten. Triton 3.6's Gluon has no wrapper for it; its builder has the op."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    @gluon.jit
    def _reduce_piece(dq_desc, slot, piece, row, col):
        """Stage one fp32 piece of dQ in shared memory ``slot`` (free: the last ``tma.store_wait`` passed) and add it
        into ``dq_desc``'s box at [row, col] by a TMA reduction, once every warp's part is there."""
        slot.store(piece)
        fence_async_shared()
        gl.thread_barrier()
        _tma_reduce_add(dq_desc, [row, col], slot)

    @gluon.jit
    def _store_rows(ptr0, acc, stride_t, row_start, L, n_rows, ROWS: gl.constexpr, D: gl.constexpr,
                    num_warps: gl.constexpr):
        """Write an fp32 accumulator tile as rows [row_start, row_start + ROWS) of a [tokens, ·] output (rows ≥ L
        as 0, rows ≥ n_rows not at all)."""
        TPW_N: gl.constexpr = D // 8
        io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
        rows = row_start + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, io))
        x = gl.convert_layout(acc.to(ptr0.dtype.element_ty), io)
        x = gl.where(rows[:, None] < L, x, 0.0)
        gl.store(ptr0 + rows.to(gl.int64)[:, None] * stride_t + cols[None, :], x, mask=(rows < n_rows)[:, None])

    @gluon.jit
    def hopper_bwd_kv_kernel(q_desc, k_desc, v_desc, do_desc, DK, DV, DQ32, SeqInfo, scale, bias, N, H_kv, GROUP,
                             stride_dkt, stride_dvt, stride_dqh,
                             VARLEN: gl.constexpr, HAS_LENS: gl.constexpr, LOG_N_BIAS: gl.constexpr,
                             FAST_SIGMOID: gl.constexpr, CLEAN: gl.constexpr, BLOCK_M: gl.constexpr,
                             BLOCK_N: gl.constexpr, D: gl.constexpr, DQ_ATOMIC: gl.constexpr, PROBE: gl.constexpr,
                             OVERLAP: gl.constexpr, SIG: gl.constexpr, DQ_TMA: gl.constexpr = 0):
        NW: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = q_desc.dtype
        pid_n = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H_kv
        hk = pid_bh % H_kv
        row0, L, n_rows = _seq(b, SeqInfo, N, VARLEN, HAS_LENS)
        start_n = pid_n * BLOCK_N
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                        instr_shape=[16, D, 16])
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        # dQ [BLOCK_M, D] = dS·K in DQ_SPLIT pieces of 64 columns of D (K sliced along D; dS is dSᵀ's shared memory
        # read transposed): a warpgroup (4 warps) spans the 64 query rows, the warpgroups split the piece's columns;
        # each thread holds pairs of adjacent columns, added by one vector reduction each (_red_add_v2)
        DQ_SPLIT: gl.constexpr = D // 64
        PIECE: gl.constexpr = D // DQ_SPLIT
        dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, NW // 4],
                                                       instr_shape=[16, PIECE // (NW // 4), 16])
        dk = gl.zeros([BLOCK_N, D], gl.float32, acc_l)
        dv = gl.zeros([BLOCK_N, D], gl.float32, acc_l)
        LATE: gl.constexpr = OVERLAP == 2 and not DQ_ATOMIC  # dK's GEMM runs on into the next step
        NS: gl.constexpr = 3 if LATE else 2  # Q/dO buffers: with LATE a buffer is refilled one step later
        if start_n < L:
            k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], v_desc.layout)
            q_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_M, D], q_desc.layout)
            do_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_M, D], do_desc.layout)
            kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            ld_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
            if DQ_ATOMIC:  # dSᵀ of the current query tile: the B operand of dQᵀ = Kᵀ·dSᵀ
                ds_smem = gl.allocate_shared_memory(
                    dtype, [BLOCK_N, BLOCK_M], gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
                p_smem = gl.allocate_shared_memory(  # Pᵀ too: every GEMM reads shared memory, none pins registers
                    dtype, [BLOCK_N, BLOCK_M], gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
                if DQ_TMA:  # dQ's pieces staged for the TMA reductions (DQ32: a descriptor, box [BLOCK_M, PIECE])
                    dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_SPLIT, BLOCK_M, PIECE], DQ32.layout)
                else:
                    dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_l))
                    dq_cols = gl.arange(0, PIECE, layout=gl.SliceLayout(0, dq_l))
            mbarrier.init(kv_bar, count=1)
            for i in gl.static_range(NS):
                mbarrier.init(ld_bar.index(i), count=1)
            fence_async_shared()
            c1, c0 = _coeffs(scale, bias, L, LOG_N_BIAS)
            _load_pair(k_desc, v_desc, k_smem, v_smem, kv_bar, row0 + start_n, hk * D)
            n_m = gl.cdiv(L, BLOCK_M)
            total = GROUP * n_m
            # with dQ atomics, each key tile starts its walk at another query tile, so the CTAs of one sequence
            # do not all add into the same dQ rows at once (step i takes item (i + rot) mod total)
            rot = (pid_n % n_m) if DQ_ATOMIC else 0  # < n_m: item rot is query tile rot of the group's first head
            for t in gl.static_range(NS - 1):  # the first NS − 1 steps
                if t < total:
                    _load_walk_step(q_desc, do_desc, q_smem, do_smem, ld_bar, t, rot, total, n_m, row0, hk, GROUP,
                                    NS, BLOCK_M, D)
            cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_l))
            mbarrier.wait(kv_bar, 0)
            if DQ_ATOMIC:
                if CLEAN:  # dQᵀ = Kᵀ·dSᵀ contracts over keys: K rows ≥ L must be 0, not NaN
                    if start_n + BLOCK_N > L:
                        _zero_tail(k_smem, start_n, L, BLOCK_N, D, NW)
                keys_in = (start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_l))) < L
            if LATE:  # the register A operands of the GEMMs still in flight at the top of a step
                pa = gl.zeros([BLOCK_N, BLOCK_M], dtype, a_l)
                dsa = gl.zeros([BLOCK_N, BLOCK_M], dtype, a_l)
                dk = warpgroup_mma_init(dk)  # loop-carried as in-flight accumulators
                dv = warpgroup_mma_init(dv)
            for i in range(total):
                buf = i % NS
                if i + NS - 1 < total and not LATE:  # prefetch the next step (NS = 2); its buffer's GEMMs finished
                    _load_walk_step(q_desc, do_desc, q_smem, do_smem, ld_bar, i + NS - 1, rot, total, n_m, row0, hk,
                                    GROUP, NS, BLOCK_M, D)
                mbarrier.wait(ld_bar.index(buf), (i // NS) & 1)
                item = (i + rot) % total  # the walk's item (see _load_walk_step)
                start_m = (item % n_m) * BLOCK_M
                if CLEAN:
                    if start_m + BLOCK_M > L:
                        _zero_tail(q_smem.index(buf), start_m, L, BLOCK_M, D, NW)
                        _zero_tail(do_smem.index(buf), start_m, L, BLOCK_M, D, NW)
                st = warpgroup_mma(k_smem, q_smem.index(buf).permute((1, 0)),
                                   gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l), use_acc=False, is_async=True)
                dpt = warpgroup_mma(v_smem, do_smem.index(buf).permute((1, 0)),
                                    gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_l), use_acc=False, is_async=True)
                if (DQ_ATOMIC and DQ_TMA == 0) or OVERLAP == 0:
                    st, dpt = warpgroup_mma_wait(0, deps=(st, dpt))
                elif DQ_ATOMIC or OVERLAP == 1:  # Sᵀ done, dPᵀ still running under σ
                    st = warpgroup_mma_wait(1, deps=(st,))
                else:  # last step's dV, dK and this Sᵀ done (in order), dPᵀ still running
                    dv, dk, pa, dsa, st = warpgroup_mma_wait(1, deps=(dv, dk, pa, dsa, st))
                    gl.thread_barrier()  # both warpgroups are done with the last step's buffer: refill it
                    if i + NS - 1 < total:
                        _load_walk_step(q_desc, do_desc, q_smem, do_smem, ld_bar, i + NS - 1, rot, total, n_m, row0,
                                        hk, GROUP, NS, BLOCK_M, D)
                keep = (start_m + cols) < L
                if PROBE == 1:  # timing probe only (wrong gradients): the GEMMs and data movement without σ and dS
                    pt = gl.where(keep[None, :], st, 0.0)
                else:
                    pt = gl.where(keep[None, :], _prob(st * c1 + c0, FAST_SIGMOID, SIG), 0.0)
                if not DQ_ATOMIC and OVERLAP >= 1:  # dV = Pᵀ·dO runs while dSᵀ is computed
                    pa = gl.convert_layout(pt.to(dtype), a_l)
                    dv = warpgroup_mma(pa, do_smem.index(buf), dv, is_async=True)
                    dpt = warpgroup_mma_wait(1, deps=(dpt,))
                elif DQ_ATOMIC and DQ_TMA and OVERLAP >= 1:
                    dpt = warpgroup_mma_wait(0, deps=(dpt,))
                if PROBE == 1:
                    dst = gl.where(keep[None, :], dpt, 0.0)
                else:
                    # no mask: Pᵀ is 0 at query columns ≥ L and dPᵀ is finite there (dO's tail zeroed, or the
                    # next cell's); NaN can reach only key rows ≥ L, which dK never stores (and dQ masks below)
                    dst = gl.fma(-pt, pt, pt) * dpt
                if DQ_ATOMIC:  # key rows ≥ L reach dQ here (not only dK rows that are never stored)
                    dst = gl.where(keys_in[:, None], dst, 0.0)
                dsb = dst.to(dtype)
                if DQ_ATOMIC:  # both warpgroups' halves of dSᵀ in shared memory before either reads it
                    if DQ_TMA:  # the last step's reductions have read dq_smem (the barrier below tells every warp)
                        tma.store_wait(0)
                    ds_smem.store(dsb)
                    p_smem.store(pt.to(dtype))
                    fence_async_shared()
                    gl.thread_barrier()
                    h_i = hk * GROUP + item // n_m
                    if DQ_TMA:  # the box's first row in the [H·(tokens + BLOCK_M), D] view of the buffer
                        dq_row = h_i * (stride_dqh // D) + row0 + start_m
                    if DQ_TMA == 2:  # dQ's pieces first, then dV and dK: each piece goes to shared memory while
                        # the tensor cores run the GEMMs behind it (wgmma groups complete in order)
                        dq0 = warpgroup_mma(ds_smem.permute((1, 0)), k_smem.slice(0, PIECE, dim=1),
                                            gl.zeros([BLOCK_M, PIECE], gl.float32, dq_l), use_acc=False,
                                            is_async=True)
                        if DQ_SPLIT == 2:
                            dq1 = warpgroup_mma(ds_smem.permute((1, 0)), k_smem.slice(PIECE, PIECE, dim=1),
                                                gl.zeros([BLOCK_M, PIECE], gl.float32, dq_l), use_acc=False,
                                                is_async=True)
                        dv = warpgroup_mma(p_smem, do_smem.index(buf), dv, is_async=True)
                        dk = warpgroup_mma(ds_smem, q_smem.index(buf), dk, is_async=True)
                        dq0 = warpgroup_mma_wait(DQ_SPLIT + 1, deps=(dq0,))
                        _reduce_piece(DQ32, dq_smem.index(0), dq0 * scale, dq_row, 0)
                        if DQ_SPLIT == 2:
                            dq1 = warpgroup_mma_wait(2, deps=(dq1,))
                            _reduce_piece(DQ32, dq_smem.index(1), dq1 * scale, dq_row, PIECE)
                        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
                    else:
                        dv = warpgroup_mma(p_smem, do_smem.index(buf), dv, is_async=True)
                        dk = warpgroup_mma(ds_smem, q_smem.index(buf), dk, is_async=True)
                        # relaxed vector reductions into dQ32 [H, tokens + BLOCK_M, D] (or TMA reductions, DQ_TMA 1):
                        # per-thread offsets are compile-time constants; no mask, since query rows ≥ L of dQ are
                        # exact zeros (dSᵀ columns zeroed, K finite), so rows past L (the next cell's, or the
                        # BLOCK_M spare rows) get + 0.0
                        if not DQ_TMA:
                            base = DQ32 + h_i.to(gl.int64) * stride_dqh + (row0 + start_m).to(gl.int64) * D
                        for piece in gl.static_range(DQ_SPLIT):
                            dqp = warpgroup_mma(ds_smem.permute((1, 0)), k_smem.slice(piece * PIECE, PIECE, dim=1),
                                                gl.zeros([BLOCK_M, PIECE], gl.float32, dq_l), use_acc=False,
                                                is_async=True)
                            dqp, dv, dk = warpgroup_mma_wait(0, deps=(dqp, dv, dk))  # the first also ends dV, dK
                            if PROBE != 2 or scale < 0.0:  # probe 2 (timing only): the dQ GEMMs without their adds
                                if DQ_TMA:  # scaled here: the last pass only casts
                                    _reduce_piece(DQ32, dq_smem.index(piece), dqp * scale, dq_row, piece * PIECE)
                                else:
                                    _red_add_v2(base + piece * PIECE + (dq_rows[:, None] * D + dq_cols[None, :]),
                                                dqp)
                else:
                    if OVERLAP == 0:
                        pa = gl.convert_layout(pt.to(dtype), a_l)
                        dv = warpgroup_mma(pa, do_smem.index(buf), dv, is_async=True)
                    dsa = gl.convert_layout(dsb, a_l)
                    dk = warpgroup_mma(dsa, q_smem.index(buf), dk, is_async=True)
                    if not LATE:
                        dv, dk, pa, dsa = warpgroup_mma_wait(0, deps=(dv, dk, pa, dsa))
                if not LATE:
                    gl.thread_barrier()  # every warpgroup is done with buffer `buf` (and dSᵀ) before it is refilled
            if LATE:
                dv, dk, pa, dsa = warpgroup_mma_wait(0, deps=(dv, dk, pa, dsa))
            if DQ_TMA:
                tma.store_wait(0)  # no reduction may still read shared memory when the CTA exits
            dk = dk * scale
        if start_n < n_rows:
            _store_rows(DK + row0.to(gl.int64) * stride_dkt + hk * D, dk, stride_dkt, start_n, L, n_rows,
                        BLOCK_N, D, NW)
            _store_rows(DV + row0.to(gl.int64) * stride_dvt + hk * D, dv, stride_dvt, start_n, L, n_rows,
                        BLOCK_N, D, NW)

    @gluon.jit
    def hopper_bwd_q_kernel(q_desc, k_desc, v_desc, do_desc, DQ, SeqInfo, scale, bias, N, H, GROUP, stride_dqt,
                            VARLEN: gl.constexpr, HAS_LENS: gl.constexpr, LOG_N_BIAS: gl.constexpr,
                            FAST_SIGMOID: gl.constexpr, CLEAN: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, D: gl.constexpr, PROBE: gl.constexpr, OVERLAP: gl.constexpr,
                            SIG: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = q_desc.dtype
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        row0, L, n_rows = _seq(b, SeqInfo, N, VARLEN, HAS_LENS)
        start_m = pid_m * BLOCK_M
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                        instr_shape=[16, D, 16])
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        dq = gl.zeros([BLOCK_M, D], gl.float32, acc_l)
        NS: gl.constexpr = 3 if OVERLAP == 2 else 2  # K/V buffers: with OVERLAP 2 a buffer is refilled one step later
        if start_m < L:
            q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
            do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], do_desc.layout)
            k_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_N, D], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_N, D], v_desc.layout)
            q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            ld_bar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
            mbarrier.init(q_bar, count=1)
            for i in gl.static_range(NS):
                mbarrier.init(ld_bar.index(i), count=1)
            fence_async_shared()
            c1, c0 = _coeffs(scale, bias, L, LOG_N_BIAS)
            _load_pair(q_desc, do_desc, q_smem, do_smem, q_bar, row0 + start_m, h * D)
            n_kv = gl.cdiv(L, BLOCK_N)
            for t in gl.static_range(NS - 1):
                if t < n_kv:
                    _load_step(k_desc, v_desc, k_smem, v_smem, ld_bar, t, row0 + t * BLOCK_N, hk * D, NS)
            s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_l)
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
            mbarrier.wait(q_bar, 0)
            if OVERLAP == 2:  # dQ's GEMM runs on into the next step: its register A operand stays live
                dsa = gl.zeros([BLOCK_M, BLOCK_N], dtype, a_l)
                dq = warpgroup_mma_init(dq)
            for j in range(n_kv):
                buf = j % NS
                if j + NS - 1 < n_kv and OVERLAP < 2:  # prefetch the next step (NS = 2); its buffer's GEMMs finished
                    _load_step(k_desc, v_desc, k_smem, v_smem, ld_bar, j + NS - 1, row0 + (j + NS - 1) * BLOCK_N,
                               hk * D, NS)
                mbarrier.wait(ld_bar.index(buf), (j // NS) & 1)
                start_n = j * BLOCK_N
                if CLEAN:
                    if start_n + BLOCK_N > L:  # dS·K: K rows ≥ L must be 0, not NaN
                        _zero_tail(k_smem.index(buf), start_n, L, BLOCK_N, D, NW)
                s = warpgroup_mma(q_smem, k_smem.index(buf).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                dp = warpgroup_mma(do_smem, v_smem.index(buf).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                if OVERLAP == 0:
                    s, dp = warpgroup_mma_wait(0, deps=(s, dp))
                elif OVERLAP == 1:  # S done, dP still running under σ
                    s = warpgroup_mma_wait(1, deps=(s,))
                else:  # last step's dQ and this S done (in order), dP still running
                    dq, dsa, s = warpgroup_mma_wait(1, deps=(dq, dsa, s))
                    gl.thread_barrier()  # both warpgroups are done with the last step's buffer: refill it
                    if j + NS - 1 < n_kv:
                        _load_step(k_desc, v_desc, k_smem, v_smem, ld_bar, j + NS - 1, row0 + (j + NS - 1) * BLOCK_N,
                                   hk * D, NS)
                keep = (start_n + cols) < L
                if PROBE != 1:
                    p = _prob(s * c1 + c0, FAST_SIGMOID, SIG)
                if OVERLAP >= 1:
                    dp = warpgroup_mma_wait(0, deps=(dp,))
                if PROBE == 1:  # timing probe only (wrong gradients)
                    ds = gl.where(keep[None, :], dp, 0.0)
                else:
                    ds = gl.fma(-p, p, p) * dp
                    if start_n + BLOCK_N > L:  # only the boundary tile has key columns ≥ L (V may hold NaN there)
                        ds = gl.where(keep[None, :], ds, 0.0)
                dsa = gl.convert_layout(ds.to(dtype), a_l)
                dq = warpgroup_mma(dsa, k_smem.index(buf), dq, is_async=True)
                if OVERLAP < 2:
                    dq, dsa = warpgroup_mma_wait(0, deps=(dq, dsa))
                    gl.thread_barrier()
            if OVERLAP == 2:
                dq, dsa = warpgroup_mma_wait(0, deps=(dq, dsa))
            dq = dq * scale
        if start_m < n_rows:
            _store_rows(DQ + row0.to(gl.int64) * stride_dqt + h * D, dq, stride_dqt, start_m, L, n_rows,
                        BLOCK_M, D, NW)


def launch_bwd(do, q, k, v, seq_info, *, varlen: bool, max_seqlen: int, scale: float, bias: float,
               log_n_bias: bool, causal: bool, fast_sigmoid: bool = True, kv_blocks=None, q_blocks=None,
               dq_atomic: bool | str | None = None, probe: int = 0, overlap: int | None = None, sig: int | None = None):
    """(dq, dk, dv) for ``supported`` inputs; same contract as triton_bwd.launch_bwd (outputs contiguous).
    ``dq_atomic``: dQ by fp32 atomics from the K/V kernel (5 GEMMs, one kernel, not deterministic) instead of the
    dQ kernel (7 GEMMs, deterministic): ``True`` (or ``"red"``) by vector reductions from registers, ``"tma"`` by TMA
    reductions from shared memory; default ``DQ_ATOMIC``. Timing probes (experiments only, wrong gradients):
    ``probe=1`` skips σ and dS (the time of the GEMMs, loads and stores alone), ``probe=2`` the dQ reductions of
    the atomic variant (their cost is the difference to the real kernel). ``overlap``: see ``OVERLAP``; ``sig``:
    see ``SIG_BWD``."""
    assert supported(do, q, k, v, causal), "hopper_bwd.launch_bwd called on unsupported input"
    dq_atomic = DQ_ATOMIC if dq_atomic is None else dq_atomic
    dq_tma = _tma_form(dq_atomic)
    assert dq_atomic in (False, True, "red") or dq_tma, f"dq_atomic: False, True, 'red' or 'tma', not {dq_atomic!r}"
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    D = q.shape[-1]
    H, H_kv = q.shape[-2], k.shape[-2]
    B = seq_info.shape[0] - 1 if varlen else q.shape[0]
    N = 0 if varlen else q.shape[1]
    if B == 0 or max_seqlen == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    has_lens = seq_info is not None
    if seq_info is None:
        seq_info = q.new_empty(1, dtype=torch.int32)
    kv_m, kv_n = kv_blocks or KV_BLOCKS
    q_m, q_n = q_blocks or Q_BLOCKS
    meta = dict(VARLEN=varlen, HAS_LENS=has_lens, LOG_N_BIAS=bool(log_n_bias), FAST_SIGMOID=bool(fast_sigmoid),
                CLEAN=not varlen, D=D, PROBE=int(probe), OVERLAP=OVERLAP if overlap is None else int(overlap),
                SIG=SIG_BWD if sig is None else int(sig),
                num_warps=8)
    st = (lambda t: t.stride(0)) if varlen else (lambda t: t.stride(1))  # noqa: E731
    q2, k2, v2, do2 = (_as_2d(t, varlen) for t in (q, k, v, do))
    T = q2.shape[0]  # token rows (B·N padded)
    dq32 = torch.zeros((H, T + kv_m, D), dtype=torch.float32, device=q.device) if dq_atomic else dk  # head-major
    dq_arg = _desc(dq32.view(H * (T + kv_m), D), (kv_m, 64)) if dq_tma else dq32  # box: one 64-column piece
    hopper_bwd_kv_kernel[(triton.cdiv(max_seqlen, kv_n), B * H_kv)](
        _desc(q2, (kv_m, D)), _desc(k2, (kv_n, D)), _desc(v2, (kv_n, D)), _desc(do2, (kv_m, D)), dk, dv, dq_arg,
        seq_info, float(scale), float(bias), N, H_kv, H // H_kv, st(dk), st(dv), (T + kv_m) * D, BLOCK_M=kv_m,
        BLOCK_N=kv_n, DQ_ATOMIC=bool(dq_atomic), DQ_TMA=dq_tma, **meta)
    if dq_atomic:  # [H, T, D] fp32 → q's shape (× scale unless the kernel applied it), in q's dtype
        dq32 = dq32[:, :T].permute(1, 0, 2)
        dq.view(T, H, D).copy_(dq32 if dq_tma else dq32.mul_(scale))
        return dq, dk, dv
    hopper_bwd_q_kernel[(triton.cdiv(max_seqlen, q_m), B * H)](
        _desc(q2, (q_m, D)), _desc(k2, (q_n, D)), _desc(v2, (q_n, D)), _desc(do2, (q_m, D)), dq, seq_info,
        float(scale), float(bias), N, H, H // H_kv, st(dq), BLOCK_M=q_m, BLOCK_N=q_n, **meta)
    return dq, dk, dv


def aligned_attrs(fn, sig: dict) -> dict:
    """For an offline (AOT) build: the ``tt.divisibility = 16`` hints Triton's JIT gives at run time to pointer
    arguments aligned to 16 bytes and stride arguments divisible by 16 (every tensor and stride the trainer passes).
    Without them the build is another kernel: no load is vectorised or pipelined (no ``cp.async``)."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if sig.get(n, "").startswith("*") or (n.startswith("stride_") and sig.get(n) == "i32")}


@functools.lru_cache(maxsize=None)
def compiled_for_sm90(D: int, varlen: bool, dq_atomic: bool | str = False, overlap: int = OVERLAP, probe: int = 0,
                      kv_blocks: tuple[int, int] | None = None):
    """AOT-compile the kernels for sm90 without a GPU (``benchmarks/attention_hopper_compile.py --bwd``):
    {name: compiled kernel}, bf16, −log n bias; ``kv`` and ``q``, or ``kv`` alone with ``dq_atomic``;
    ``kv_blocks`` as in ``launch_bwd`` (default ``KV_BLOCKS``)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows, cols=D, dt="bf16"):
        gdt = gl.bfloat16 if dt == "bf16" else gl.float32
        return f"tensordesc<{dt}[{rows},{cols}],{gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)!r}>"

    tma_dq = _tma_form(dq_atomic)
    kv = tuple(kv_blocks or KV_BLOCKS)

    head = {"SeqInfo": "*i32", "scale": "fp32", "bias": "fp32", "N": "i32"}
    kernels = {  # name: (kernel, (BLOCK_M, BLOCK_N), rows of the Q/dO boxes, rows of the K/V boxes, its other
        # arguments, its own constexprs)
        "kv": (hopper_bwd_kv_kernel, kv, kv[0], kv[1],
               {"DK": "*bf16", "DV": "*bf16", "DQ32": desc(kv[0], 64, "fp32") if tma_dq else "*fp32", **head,
                "H_kv": "i32", "GROUP": "i32", "stride_dkt": "i32", "stride_dvt": "i32", "stride_dqh": "i32"},
               {"DQ_ATOMIC": bool(dq_atomic), "DQ_TMA": tma_dq}),
        "q": (hopper_bwd_q_kernel, Q_BLOCKS, Q_BLOCKS[0], Q_BLOCKS[1],
              {"DQ": "*bf16", **head, "H": "i32", "GROUP": "i32", "stride_dqt": "i32"}, {})}
    if dq_atomic:
        del kernels["q"]
    out = {}
    for name, (kern, (bm, bn), q_rows, k_rows, rest, own) in kernels.items():
        sig = {"q_desc": desc(q_rows), "k_desc": desc(k_rows), "v_desc": desc(k_rows), "do_desc": desc(q_rows), **rest}
        const = dict(VARLEN=varlen, HAS_LENS=True, LOG_N_BIAS=True, FAST_SIGMOID=True, CLEAN=not varlen,
                     BLOCK_M=bm, BLOCK_N=bn, D=D, PROBE=probe, OVERLAP=overlap, SIG=SIG_BWD, **own)
        sig.update({k: "constexpr" for k in const})
        out[name] = triton.compile(GluonASTSource(kern, sig, constexprs=const, attrs=aligned_attrs(kern, sig)),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    return out
