"""bpt's C++ LLaMA from Python: ``torch.classes.bpt.Llama`` in ``libbpt_models.so``.

For tests and benchmarks that put bpt beside ``transformers``::

    from bpt.llama import Llama
    model = Llama("path/to/hf_or_bpt_dir")          # or Llama.preset("tiny")
    logits = model.logits(input_ids)                 # [B, T, vocab]
    loss = model.loss(input_ids, targets); loss.backward()
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import library_path

_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        path = Path(library_path()).with_name("libbpt_models.so")
        if not path.is_file():
            raise ImportError(f"bpt: {path} not found; run `make build` first")
        torch.classes.load_library(str(path))
        _loaded = True


class Llama:
    """A bpt LlamaForCausalLM loaded from a checkpoint directory (or a preset)."""

    def __init__(self, source: str | Path, **overrides):
        _load()
        text = ",".join(f"{k}={v}" for k, v in overrides.items())
        self._model = torch.classes.bpt.Llama(str(source), text)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Llama":
        return cls(f"preset:{name}", **overrides)

    def logits(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._model.logits(input_ids, segment_ids)

    def loss(self, input_ids, targets, segment_ids=None) -> torch.Tensor:
        return self._model.loss(input_ids, targets, segment_ids)

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of a 1-D prompt; stops early at the config's EOS ids."""
        return self._model.generate(prompt_ids, max_new_tokens, use_cache)

    def save(self, directory: str | Path, hf_format: bool = False) -> None:
        self._model.save(str(directory), hf_format)

    def parameters(self) -> list[torch.Tensor]:
        return self._model.parameters()

    def zero_grad(self) -> None:
        self._model.zero_grad()
