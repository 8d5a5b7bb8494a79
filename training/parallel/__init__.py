"""Parallelism applied to the model from outside it (torchtitan style): the model code knows nothing of ranks.

* :mod:`training.parallel.dims` — world = DP × CP, the process groups (DeepSpeed's Ulysses ``parallel_state_sp``
  mpu) and which rank draws which data.
* :mod:`training.parallel.sharding` — a packed micro-batch padded and cut into P equal token shards.
* :mod:`training.parallel.ulysses` — context-parallel attention: DeepSpeed's sequence all-to-all (over heads)
  around our unchanged packed-varlen attention core.
* :mod:`training.parallel.ulysses_pipelined` — the same exchange in C head chunks whose all-to-alls overlap the
  other chunks' attention (``parallel.context_parallel_chunks``).
"""

from training.parallel.dims import ParallelDims, backward_scale, init_parallel
from training.parallel.sharding import CPShard, shard_batch
from training.parallel.ulysses import apply_context_parallel

__all__ = ["CPShard", "ParallelDims", "apply_context_parallel", "backward_scale", "init_parallel", "shard_batch"]
