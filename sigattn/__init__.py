"""sigattn: sigmoid attention ``out = sigmoid(Q·Kᵀ·scale + b)·V`` as ``torch.ops.sigattn`` ops (C++ CPU kernels,
Triton CUDA kernels), differentiable, torch.compile-able, with padded and varlen layouts."""

from . import ops  # noqa: F401  (loads sigattn._C: schemas, CPU kernels; fake kernels, autograd, FLOPs)
from .api import input_checks, sigmoid_attention, sigmoid_attention_varlen

try:
    from . import triton_ops  # noqa: F401  (registers the CUDA kernels)
except ImportError:
    pass

__all__ = ["input_checks", "sigmoid_attention", "sigmoid_attention_varlen"]
