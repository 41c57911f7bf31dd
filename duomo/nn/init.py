"""Building a module without initialising it, for when its weights are about to be loaded.

Random initialisation is most of the cost of building a model that a checkpoint then overwrites (96% of
`duomo.load` of a ViT-B-32). Inside `skip_init()`, torch's `nn.init` functions and the `reset_parameters`
they serve do nothing: parameters keep whatever `torch.empty` gave them, so the caller must load every one
(duomo's loaders are strict and name what is missing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Within the block, `nn.init.*` leaves tensors as allocated (uninitialised memory)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
