"""Adding up what autograd saves for the backward pass (``launcher describe``'s activation
and loss measurements): each storage once, however many views of it are saved."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ops.weight_recast import parameter_cast_source


class SavedTensors:
    """Adds up the storages autograd saves for backward, each once, minus ``exclude``;
    with ``recast_weights``, minus low-precision copies of parameters too (the train loop
    recasts those in backward instead of saving them: ops/weight_recast.py)."""

    def __init__(self, exclude: Sequence[torch.Tensor] = (), recast_weights: bool = False) -> None:
        self.sizes: dict[int, int] = {}
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.recast_weights = recast_weights

    def add(self, tensor: torch.Tensor) -> None:
        if self.recast_weights and parameter_cast_source(tensor) is not None:
            return
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude:  # _cdata: the storage's identity, shared by views
            self.sizes[storage._cdata] = storage.nbytes()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())
