"""Architecture of the bundled `mlp` model (64 -> 256 -> 256 -> 8).

Versions that ship `model.safetensors` are built by `build_model` and get their weights
from the file; versions that ship `model.pt2` carry their own graph.
"""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 256, depth: int = 2, d_out: int = 8):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)


def build_model(**kwargs) -> nn.Module:
    return MLP(**kwargs)
