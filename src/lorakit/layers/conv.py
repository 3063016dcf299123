"""LoRA for ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel and stride, B a 1x1 conv to the outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.layers.base import LoraLayer, kaiming_a


class LoraConv(LoraLayer):
    """``y = conv(x) + scaling * B(A(dropout(x)))``, ``A: (r, in, *kernel)``, ``B: (out, r, 1, ...)``."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        if base_layer.groups != 1:
            raise ConfigError(
                f"LoRA on grouped convolutions is not supported (got groups={base_layer.groups} on {base_layer!r}); "
                "exclude this module with exclude_modules"
            )
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()  # adapter -> ConvNd(in, r, kernel, stride, padding, dilation)
        self.lora_B = nn.ModuleDict()  # adapter -> ConvNd(r, out, 1)

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        conv = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _plain_conv(base)
        self.lora_A[name] = conv(
            base.in_channels,
            r,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            padding_mode=base.padding_mode,
            bias=False,
            dtype=dtype,
            device=device,
        )
        self.lora_B[name] = conv(r, base.out_channels, 1, bias=False, dtype=dtype, device=device)

    @torch.no_grad()
    def _init_factors(self, name: str, init: bool | str) -> None:
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / self.r[name])
        else:
            kaiming_a(self.lora_A[name].weight)
        nn.init.zeros_(self.lora_B[name].weight)

    def lora_forward(self, x: Tensor, name: str) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(self.lora_dropout[name](x).to(a.weight.dtype))) * self.scaling[name]

    def delta_weight(self, name: str) -> Tensor:
        a = self.lora_A[name].weight.float()  # (r, in, *kernel)
        b = self.lora_B[name].weight.float().flatten(1)  # (out, r)
        return (b @ a.flatten(1)).reshape(self.base_layer.weight.shape) * self.scaling[name]  # (out, in, *kernel)


def _plain_conv(base: nn.Module) -> type[nn.Module]:
    for cls in (nn.Conv3d, nn.Conv2d, nn.Conv1d):
        if isinstance(base, cls):
            return cls
    raise ConfigError(f"{type(base).__name__} is not a Conv1d/2d/3d")
