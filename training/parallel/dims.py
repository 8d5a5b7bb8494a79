"""World = DP × CP: which rank does what, and the process groups DeepSpeed and the attention use.

Ranks are laid out CP-innermost (DeepSpeed's ``parallel_state_sp``, Megatron's convention): global rank
``g = dp_rank·P + cp_rank``, so a CP group is P consecutive ranks — one node's GPUs when P ≤ GPUs per node,
where the per-layer all-to-alls run over NVLink. mosaicml-streaming's ``replication=P`` gives those P
consecutive ranks the same samples.

* Data: the loader and the masking draw from ``dp_rank`` over ``dp`` ranks — the P ranks of a CP group
  see the same cells and the same masked genes, then each keeps its shard
  (:func:`training.parallel.sharding.shard_batch`).
* Gradients and ZeRO: with CP > 1 the engine gets DeepSpeed's Ulysses mpu
  (``deepspeed.runtime.sequence_parallel.parallel_state_sp``): ZeRO partitions and all-reduces over the
  sequence-data-parallel group (all DP × CP ranks) and divides by ``world/P = dp``. Rank r's gradient is
  that of its partial loss ``L_r`` (the all-to-all's backward routes every token's gradient to the rank
  that owns it), ``Σ_r L_r`` is its DP rank's micro-batch loss, so ``(Σ_world g)/dp`` is exactly the
  DP = d, CP = 1 gradient (up to summation order). The gradient norm for clipping is counted once per
  CP group (the mpu is DeepSpeed's "model parallel" group for ``clip_grad_norm_``; ZeRO 1/2 compute it
  over their partitions).
* ZeRO-3 exception (DeepSpeed 0.19.8): its default coalesced reduce-scatter pre-divides by the whole
  DP × CP group and ignores the sequence-parallel size (stages 0–2 divide by ``dp``; DeepSpeed issue
  #6841), which would leave gradients ``P×`` too small — harmless to Adam's direction but wrong for the
  norm, clipping and ``eps``. :func:`backward_scale` gives the factor P the trainer multiplies the loss by
  before ``backward`` under ZeRO-3 (the logged loss is unscaled); the CP = 2 vs 1 test under ZeRO-3
  fails if DeepSpeed changes this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from training.config import check_heads


@dataclass(frozen=True)
class ParallelDims:
    world: int
    rank: int
    cp: int = 1
    cp_group: Any = None          # ProcessGroup of this rank's P context-parallel ranks (None when P = 1)
    mpu: Any = None               # passed to deepspeed.initialize(mpu=...) (None when P = 1)

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp


def check_degree(cp: int, world: int, n_heads: int) -> None:
    """ValueError naming the problem when P cannot split this world or this model's heads."""
    if cp < 1:
        raise ValueError(f"parallel.context_parallel_degree must be >= 1, got {cp}")
    if world % cp:
        raise ValueError(f"parallel.context_parallel_degree={cp} does not divide the world size {world} "
                         f"(world = data-parallel × context-parallel ranks)")
    check_heads(n_heads, cp)


def backward_scale(cp: int, zero_stage: int) -> float:
    """Factor on the loss before ``engine.backward`` so every ZeRO stage applies ``Σ_world g / dp`` (see above)."""
    return float(cp) if cp > 1 and zero_stage == 3 else 1.0


def init_parallel(cp: int, n_heads: int) -> ParallelDims:
    """Build the CP and DP×CP groups (collective: every rank calls it) after the process group is up."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_degree(cp, world, n_heads)
    if cp == 1:
        return ParallelDims(world, rank)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
    mpu._release_sequence_parallel_groups()          # a previous trainer in this process built them
    mpu.initialize_sequence_parallel(cp)
    return ParallelDims(world, rank, cp, mpu.get_sequence_parallel_group(), mpu)
