"""Let ``import streaming`` work on a CPU-only torch.

mosaicml-streaming imports ``streaming.vision`` (hence torchvision) unconditionally. PyPI ships
torchvision only as CUDA builds; beside the CPU build of torch their compiled ``_C`` cannot load,
and torchvision then fails at import in ``_meta_registrations`` registering fake kernels for
``torchvision::nms``/``qnms``, ops that no longer exist. We never call torchvision; defining those
two schemas (no kernels) before the import lets its pure-Python parts load. On a CUDA torch with a
matching torchvision this is a no-op.
"""

from __future__ import annotations

import importlib.util

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None


def ensure_importable() -> None:
    """Define the missing torchvision op schemas if torchvision's extension cannot load."""
    global _LIB
    if _LIB is not None or importlib.util.find_spec("torchvision") is None:
        return
    missing = [n for n in _SCHEMAS if not torch._C._dispatch_has_kernel(f"torchvision::{n}")]
    try:
        torch.ops.load_library  # noqa: B018 - torch must be initialised before probing
        from torchvision import extension  # noqa: F401  (loads _C when it can)
    except Exception:  # torchvision's own import failed for another reason: let streaming say so
        pass
    if missing and not hasattr(torch.ops.torchvision, "nms"):
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS.values():
            _LIB.define(schema)
