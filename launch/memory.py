"""Per-GPU memory of bf16 mixed-precision AdamW training under ZeRO, and the micro-batch that fits.

Model states per parameter (ZeRO paper, Rajbhandari et al. 2020): bf16 weights 2 B + bf16 grads 2 B +
fp32 master weights, Adam m and v 12 B = 16 B. Over G data-parallel GPUs, ZeRO stage
0: ``16·P``; 1 (optimizer states sharded): ``4·P + 12·P/G``; 2 (+ gradients): ``2·P + 14·P/G``;
3 (+ weights): ``16·P/G`` (plus the largest layer gathered, ignored here).

Activations per token and layer in bf16 (Korthikanti et al. 2022, "Reducing Activation Recomputation",
``34·d + 5·a·s``, without the ``5·a·s`` attention-score term because the attention kernels never store
the scores, and without the two 1-byte dropout masks, ``2·d``, of the attention and MLP outputs because
the encoder has no dropout): ``32·d`` bytes. Without checkpointing a micro-batch of ``b`` cells × ``s``
tokens keeps ``32·d·L·b·s``; with full activation checkpointing only each layer's input (``2·d·L·b·s``)
plus one layer being recomputed (``32·d·b·s``). The head adds ``b·s·(2·d + 4·n_bins)`` (mask ratio ignored: upper bound).
``usable = gpu_mem · (1 − reserve)`` leaves room for the CUDA context, allocator fragmentation and
communication buffers.

Context parallelism of degree P (``training.parallel``, Ulysses) gives each GPU ``⌈s/P⌉`` tokens of every
cell; the attention core holds all tokens for H/P heads, the same bytes, so activations per GPU are
those of ``⌈s/P⌉`` tokens (÷ P). ZeRO shards over all ``gpus`` = DP × P. The price is 4 all-to-alls per
layer forward (q, k, v, out) and 4 backward (+4 for the recomputed forward under checkpointing), each
sending ``(P−1)/P`` of the rank's ``t·d`` bf16 elements: ``cp_comm_bytes`` per GPU and local token.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.model_size import ModelSize

GiB = 2**30


def cp_comm_bytes(m: ModelSize, context_parallel: int, checkpointing: bool = False) -> float:
    """Bytes each GPU sends per local token and step in the Ulysses all-to-alls (0 without CP)."""
    P = context_parallel
    return (24.0 if checkpointing else 16.0) * m.d_model * m.n_layers * (P - 1) / P


def model_state_bytes(n_params: int, zero_stage: int, gpus: int) -> float:
    p, g = float(n_params), max(1, gpus)
    if zero_stage == 0:
        return 16 * p
    if zero_stage == 1:
        return 4 * p + 12 * p / g
    if zero_stage == 2:
        return 2 * p + 14 * p / g
    if zero_stage == 3:
        return 16 * p / g
    raise ValueError(f"ZeRO stage must be 0-3, got {zero_stage}")


def activation_bytes(m: ModelSize, cells: int, tokens_per_cell: int, checkpointing: bool, n_bins: int = 51) -> float:
    t = float(cells) * tokens_per_cell
    per_layer = 32.0 * m.d_model * t
    body = (2.0 * m.d_model * t * m.n_layers + per_layer) if checkpointing else per_layer * m.n_layers
    return body + t * (2 * m.d_model + 4 * n_bins)


@dataclass(frozen=True)
class Feasibility:
    model_state_gib: float
    act_gib_per_cell: float          # without checkpointing
    act_gib_per_cell_ckpt: float     # with activation checkpointing
    max_cells: int                   # largest micro-batch without checkpointing (0: none fits)
    max_cells_ckpt: int              # largest micro-batch with checkpointing
    verdict: str                     # "fits" | "fits with activation checkpointing" | "does not fit"


def feasibility(m: ModelSize, tokens_per_cell: int, zero_stage: int, gpus: int, gpu_mem_gib: float = 80.0,
                reserve: float = 0.1, context_parallel: int = 1) -> Feasibility:
    if context_parallel < 1 or gpus % context_parallel:
        raise ValueError(f"context_parallel={context_parallel} must be >= 1 and divide gpus={gpus}")
    states = model_state_bytes(m.n_params, zero_stage, gpus)
    free = gpu_mem_gib * GiB * (1 - reserve) - states
    tokens_per_cell = -(-tokens_per_cell // context_parallel)      # this GPU's share of every cell
    a1 = activation_bytes(m, 1, tokens_per_cell, False)
    # with checkpointing one recomputed layer is a fixed cost per micro-batch as well
    a1c = activation_bytes(m, 1, tokens_per_cell, True)
    max_cells = max(0, int(free // a1)) if free > 0 else 0
    max_cells_c = max(0, int(free // a1c)) if free > 0 else 0
    verdict = "fits" if max_cells >= 1 else ("fits with activation checkpointing" if max_cells_c >= 1 else "does not fit")
    return Feasibility(states / GiB, a1 / GiB, a1c / GiB, max_cells, max_cells_c, verdict)
