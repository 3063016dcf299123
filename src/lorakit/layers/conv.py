"""LoRA for ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel and stride, B a 1x1 conv to the outputs.

A DoRA adapter's magnitude has PEFT's shape ``(1, out, 1, ...)`` (one value per output channel, the norm taken over
each whole filter ``(in, *kernel)``); see `lorakit.layers.dora`.
"""

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

    def lora_forward(self, x: Tensor, name: str, dropout: bool = True) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x) if dropout else x
        return b(a(x.to(a.weight.dtype))) * self.scaling[name]  # (batch, out, *spatial)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A (r, in, *kernel), B (out, r, 1, ...))`` as stored (DoRA flattens them to matrices)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    # ---- DoRA: channels are dim 1 of the output, the magnitude is (1, out, 1, ...) ------------------------------
    def magnitude_shape(self) -> tuple[int, ...]:
        weight = self.base_layer.weight  # (out, in, *kernel)
        return (1, weight.shape[0], *([1] * (weight.dim() - 2)))

    def feature_view(self, v: Tensor, result: Tensor) -> Tensor:
        """``(out,)`` -> ``(out, 1, ...)``, ``(batch, out)`` -> ``(batch, out, 1, ...)``: channels precede space."""
        return v.view(*v.shape, *([1] * (self.base_layer.weight.dim() - 2)))

    def base_term(self, x: Tensor) -> Tensor:
        weight = self.base_layer.weight
        return self.base_layer._conv_forward(x.to(weight.dtype), weight, None)  # honours padding_mode

    def delta_weight(self, name: str) -> Tensor:
        a = self.lora_A[name].weight.float()  # (r, in, *kernel)
        b = self.lora_B[name].weight.float().flatten(1)  # (out, r)
        return (b @ a.flatten(1)).reshape(self.base_layer.weight.shape) * self.scaling[name]  # (out, in, *kernel)


def _plain_conv(base: nn.Module) -> type[nn.Module]:
    for cls in (nn.Conv3d, nn.Conv2d, nn.Conv1d):
        if isinstance(base, cls):
            return cls
    raise ConfigError(f"{type(base).__name__} is not a Conv1d/2d/3d")
