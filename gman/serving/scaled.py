"""`ScaledGMAN`: the network with the package's scaling around it, the module that exports take."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from gman.model import GMAN


class ScaledGMAN(nn.Module):
    """GMAN with the package's scaling around it: raw readings [B, P, N] + time [B, P+Q, 2] -> [B, Q, N] data units.

        mask = v is not NaN and v != missing_value
        x    = (v - mean) / std where mask, else missing_input (the scaler's; 0 = the mean)
        out  = GMAN(x, time) * std + mean

    Exported graphs (ONNX, torch.export) take this module, so a deployed graph
    needs no gman code around it: only the sensor order and time features.
    """

    def __init__(self, model: "GMAN", mean: float, std: float, missing_value: float | None, missing_input: float = 0.0):
        super().__init__()
        self.model = model
        self.mean = float(mean)
        self.std = float(std)
        self.missing_value = missing_value
        self.missing_input = float(missing_input)

    def forward(self, values: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(values)
        if self.missing_value is not None:
            mask = mask & (values != self.missing_value)
        x = torch.where(mask, (values - self.mean) / self.std, torch.full_like(values, self.missing_input))
        return self.model(x, time) * self.std + self.mean
