"""DINO projection head: MLP -> bottleneck -> L2-norm -> weight-normalised prototypes.

DINOv2 defaults: 3 layers, hidden 2048, bottleneck 256, 65,536 prototypes (131,072 for ViT-g).
The prototype layer is weight-normalised with the norm fixed to 1 (the official ``weight_g = 1``):
we store the direction ``V`` and use ``V / ||V||`` row-wise, which is the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        # float32 under autocast (TrainConfig.fp32_heads): a setting, not state (no buffer, no checkpoint)
        self.float32 = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)  # official init
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        z = F.normalize(z, dim=-1, eps=eps)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))
