"""Regional ``torch.compile``: each encoder block's ``forward`` compiled on its own (torchtitan's approach).

One graph per block (attention core included: ``sigattn::attn_varlen_fwd`` is a custom op with a fake kernel, so
Dynamo keeps it in the graph; ``fullgraph=True`` turns any graph break into an error). Inductor fuses the
LayerNorm, GELU, bias and residual element-wise work around the GEMMs. Shapes are dynamic (``T`` and
``max_seqlen`` change every packed batch), so the blocks compile once, not once per batch; with PyTorch's default
of inlining ``nn.Module``s, the blocks of one model share that graph. Module hooks (DeepSpeed ZeRO-3's parameter
gathering, activation checkpointing) stay outside the compiled region, and parameter names are unchanged, so
checkpoints of compiled and eager runs are interchangeable. With context parallelism the Ulysses exchange
(``training.parallel.ulysses``, DeepSpeed's all-to-all autograd Function) is excluded from tracing: each block
compiles into the regions before and after it (``fullgraph=False`` there, the only graph break).
"""

from __future__ import annotations

import os

import torch
from torch import nn


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """Compile ``forward`` of every module in ``model.blocks`` in place; ``options`` go to ``torch.compile``
    (``backend`` defaults to ``$SIGATTN_COMPILE_BACKEND`` or Inductor: ``aot_eager`` checks graph capture and
    autograd without Inductor's code generation, for tests and debugging)."""
    options = {"fullgraph": True, "dynamic": True,
               "backend": os.environ.get("SIGATTN_COMPILE_BACKEND") or "inductor", **options}
    for block in model.blocks:
        block.forward = torch.compile(block.forward, **options)
    return model
