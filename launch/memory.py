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
plus one layer being recomputed (``32·d·b·s``); checkpointing every k-th layer (selective) keeps ``2·d`` for the
``⌈L/k⌉`` checkpointed layers and ``32·d`` for the others. The head adds ``b·s·(2·d + 4·n_bins)`` (mask ratio
ignored: upper bound).
``usable = gpu_mem · (1 − reserve)`` leaves room for the CUDA context, allocator fragmentation and
communication buffers.

Context parallelism of degree P (``training.parallel``, Ulysses) gives each GPU ``⌈s/P⌉`` tokens of every
cell; the attention core holds all tokens for H/P heads, the same bytes, so activations per GPU are
those of ``⌈s/P⌉`` tokens (÷ P). ZeRO shards over all ``gpus`` = DP × P. The price is 4 all-to-alls per
layer forward (q, k, v, out) and 4 backward (+4 for each recomputed layer's forward under checkpointing), each
sending ``(P−1)/P`` of the rank's ``t·d`` bf16 elements: ``cp_comm_bytes`` per GPU and local token.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.model_size import ModelSize

GiB = 2**30


def checkpointed_layers(n_layers: int, checkpointing: bool | int) -> int:
    """How many of ``n_layers`` blocks recompute their forward: none (False/0), all (True/1), or every k-th
    (blocks 0, k, 2k, …: ``⌈L/k⌉``), as ``model.activation_checkpointing`` says."""
    k = int(checkpointing)
    return 0 if k <= 0 else -(-n_layers // k)


def checkpointing_value(checkpointing: bool | int) -> str:
    """The ``model.activation_checkpointing=`` override text: ``false``, ``true`` or ``k``."""
    return str(checkpointing).lower() if isinstance(checkpointing, bool) else str(int(checkpointing))


def checkpointing_words(checkpointing: bool | int) -> str:
    k = int(checkpointing)
    return "no" if k == 0 else "full" if k == 1 else f"selective (every {k}th layer)"


def cp_comm_bytes(m: ModelSize, context_parallel: int, checkpointing: bool | int = False) -> float:
    """Bytes each GPU sends per local token and step in the Ulysses all-to-alls (0 without CP)."""
    P = context_parallel
    n_c = checkpointed_layers(m.n_layers, checkpointing)
    return (16.0 * m.n_layers + 8.0 * n_c) * m.d_model * (P - 1) / P


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


def activation_bytes(m: ModelSize, cells: int, tokens_per_cell: int, checkpointing: bool | int,
                     n_bins: int = 51) -> float:
    t = float(cells) * tokens_per_cell
    per_layer = 32.0 * m.d_model * t
    n_c = checkpointed_layers(m.n_layers, checkpointing)
    body = 2.0 * m.d_model * t * n_c + per_layer * (m.n_layers - n_c) + (per_layer if n_c else 0.0)
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
    tokens_per_cell = _local_tokens(tokens_per_cell, gpus, context_parallel)
    states = model_state_bytes(m.n_params, zero_stage, gpus)
    free = gpu_mem_gib * GiB * (1 - reserve) - states
    a1 = activation_bytes(m, 1, tokens_per_cell, False)
    # with checkpointing one recomputed layer is a fixed cost per micro-batch as well
    a1c = activation_bytes(m, 1, tokens_per_cell, True)
    max_cells, max_cells_c = _cells_that_fit(free, a1), _cells_that_fit(free, a1c)
    verdict = "fits" if max_cells >= 1 else ("fits with activation checkpointing" if max_cells_c >= 1 else "does not fit")
    return Feasibility(states / GiB, a1 / GiB, a1c / GiB, max_cells, max_cells_c, verdict)


def _local_tokens(tokens_per_cell: int, gpus: int, context_parallel: int) -> int:
    """This GPU's share of every cell's tokens under context parallelism (checked against ``gpus``)."""
    if context_parallel < 1 or gpus % context_parallel:
        raise ValueError(f"context_parallel={context_parallel} must be >= 1 and divide gpus={gpus}")
    return -(-tokens_per_cell // context_parallel)


def _cells_that_fit(free_bytes: float, bytes_per_cell: float) -> int:
    return max(0, int(free_bytes // bytes_per_cell)) if free_bytes > 0 else 0


# ---- choosing ZeRO stage, activation checkpointing and micro-batch -------------------------------------------
# Relative cost model (assumptions, to be calibrated with launch.measure on the target GPU):
#   time per token ∝ (1 + RECOMPUTE·ckpt) · (1 + ZERO3_OVERHEAD·[stage 3]) / eff(t),  eff(t) = t / (t + T_HALF)
# RECOMPUTE = 1/3: full checkpointing reruns each layer's forward (1 of the 3 matmul passes of a step).
# ZERO3_OVERHEAD: ZeRO-3 gathers and frees every layer's parameters in forward and backward (also on one GPU).
# T_HALF: tokens per micro-batch at which a GPU runs at half its large-batch efficiency; eff is 0.89 at 8·T_HALF.
RECOMPUTE = 1 / 3
ZERO3_OVERHEAD = 0.05
T_HALF = 2048
MAX_MICRO_TOKENS = 65536     # a larger micro-batch gains nothing measurable; the global batch is grad_accum's job


@dataclass(frozen=True)
class Plan:
    zero_stage: int
    activation_checkpointing: bool | int   # False, True (every layer) or k (every k-th layer)
    micro_batch: int                 # cells per GPU per micro-batch
    relative_speed: float            # tokens/s relative to an ideal step (no recompute, no ZeRO-3, saturated GPU)
    memory_gib: float                # model states + activations of that micro-batch, per GPU
    candidates: tuple = ()           # every feasible (zero_stage, ckpt, micro_batch, relative_speed), best first


#: the settings ``plan`` weighs: no checkpointing, every 4th / every 2nd layer (selective), every layer (full)
CHECKPOINTING = (False, 4, 2, True)


def relative_speed(zero_stage: int, checkpointing: bool | float, micro_tokens: int) -> float:
    """Modelled tokens/s (relative). ``checkpointing``: the fraction of layers recomputed (a bool: none/all)."""
    eff = micro_tokens / (micro_tokens + T_HALF)
    return eff / ((1 + RECOMPUTE * float(checkpointing)) * (1 + ZERO3_OVERHEAD * (zero_stage == 3)))


def plan(m: ModelSize, tokens_per_cell: int, gpus: int, gpu_mem_gib: float = 80.0, reserve: float = 0.1,
         context_parallel: int = 1, max_micro_tokens: int = MAX_MICRO_TOKENS) -> Plan:
    """The ZeRO stage, activation checkpointing and micro-batch with the highest modelled tokens/s that fit in
    ``gpu_mem_gib`` (see ``feasibility``); ties go to the lower stage (fewer collectives). Raises ``ValueError``
    when nothing fits at micro-batch 1."""
    local_tokens = _local_tokens(tokens_per_cell, gpus, context_parallel)
    cap = max(1, max_micro_tokens // local_tokens)
    cands = []
    for stage in (0, 1, 2, 3):
        states = model_state_bytes(m.n_params, stage, gpus)
        free = gpu_mem_gib * GiB * (1 - reserve) - states
        for ckpt in CHECKPOINTING:
            n_c = checkpointed_layers(m.n_layers, ckpt)
            if not isinstance(ckpt, bool) and n_c in (0, m.n_layers):
                continue                     # every k-th of too few layers: the same as none or full
            per_cell = activation_bytes(m, 1, local_tokens, ckpt)
            fit = _cells_that_fit(free, per_cell)
            if fit >= 1:
                b = min(fit, cap)
                cands.append((stage, ckpt, b, relative_speed(stage, n_c / m.n_layers, b * local_tokens),
                              (states + b * per_cell) / GiB))
    if not cands:
        raise ValueError(f"{m.name} at {tokens_per_cell} tokens per cell does not fit in {gpu_mem_gib:g} GiB per GPU "
                         f"on {gpus} GPU(s) with context parallelism {context_parallel}, even with ZeRO-3 and "
                         "activation checkpointing at one cell per micro-batch")
    cands.sort(key=lambda c: (-round(c[3], 6), c[0], float(c[1])))
    best = cands[0]
    return Plan(best[0], best[1], best[2], best[3], best[4], tuple(c[:4] for c in cands))
