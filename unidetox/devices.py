"""The device a model runs on."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter; CPU for a model without parameters.

    >>> model_device(torch.nn.Linear(2, 2))
    device(type='cpu')
    """
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
