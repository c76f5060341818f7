"""bpt: Blockwise Parallel Transformer ops for PyTorch.

Importing this package loads the C++ op library (libbpt_ops.so), after which the ops are
available as ``torch.ops.bpt.<op>`` with autograd, fake (Meta) kernels for
``torch.compile``, the CPU kernels, and the CUDA kernels in a CUDA build.

The library is looked up in this order: the ``BPT_OPS_LIBRARY`` environment variable, this
package's folder, then the repository's ``build-cuda/`` folder (``make build-cuda``) when
torch is a CUDA build, then ``build/``. A library must be built against the torch that loads
it: the CPU build's against the CPU wheel, the CUDA build's against the CUDA one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["library_path", "rms_norm", "rotary"]

_LIB_NAME = "libbpt_ops.so"
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _candidates() -> list[Path]:
    found = []
    if os.environ.get("BPT_OPS_LIBRARY"):
        found.append(Path(os.environ["BPT_OPS_LIBRARY"]))
    found.append(Path(__file__).resolve().parent / _LIB_NAME)
    if torch.version.cuda:
        found.append(_REPO_ROOT / "build-cuda" / _LIB_NAME)
    found.append(_REPO_ROOT / "build" / _LIB_NAME)
    return found


def library_path() -> Path:
    """The op library this package loads."""
    for path in _candidates():
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in _candidates())
    build = "make build-cuda" if torch.version.cuda else "make build"
    raise ImportError(f"bpt: {_LIB_NAME} not found (looked at {tried}); run `{build}` first")


torch.ops.load_library(str(library_path()))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension (Hugging Face LlamaRMSNorm semantics)."""
    return torch.ops.bpt.rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate_half layout: x [B, H, T, D], cos/sin [T, D] or [B, T, D]."""
    return torch.ops.bpt.rotary(x, cos, sin)
