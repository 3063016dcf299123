"""LoRA for linear maps: ``nn.Linear`` (and subclasses) and GPT-2 style ``Conv1D`` (weight stored (in, out))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers import dora
from lorakit.layers.base import LoraLayer, kaiming_a
from lorakit.layers.lora_function import lora_linear_delta
from lorakit.layers.routed import routed_dropout, row_factors
from lorakit.ops.inits import is_data_init


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2) and its subclasses, without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") for cls in type(module).__mro__)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear map.

    Integer attributes win when present (``nn.Linear``, 4-bit layers whose weight is packed); otherwise the
    weight's shape tells (``Conv1D`` stores it (in, out)).
    """
    shape = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if all(isinstance(v, int) for v in shape) and not is_hf_conv1d(module):
        return shape
    rows, cols = module.weight.shape
    return (rows, cols) if is_hf_conv1d(module) else (cols, rows)


class LoraLinear(LoraLayer):
    """``y = base(x) + scaling * B(A(dropout(x)))`` with ``A: (r, in)``, ``B: (out, r)``.

    A DoRA adapter (``use_dora``) also has a magnitude ``m: (out,)`` in ``lora_magnitude_vector`` and computes
    ``y = m / ||W + s B A||_row * (W x + s B A x) + bias`` (see `lorakit.layers.dora`).

    Args:
        base_layer: The frozen ``nn.Linear`` or ``Conv1D``; kept as ``self.base_layer``, never copied.
        fan_in_fan_out: True when the base weight is stored (in, out); only the merge layout changes.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()  # adapter -> nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.ModuleDict()  # adapter -> nn.Linear(r, out_features, bias=False)
        self.initial_factors: dict[str, tuple[Tensor, Tensor]] = {}  # PiSSA/OLoRA (A0, B0), to save as plain LoRA

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)

    @torch.no_grad()
    def _init_factors(self, name: str, init: bool | str) -> None:
        if init is False:  # both factors random (nn.Linear's init): not a no-op, for tests
            return
        if is_data_init(init):  # PiSSA / OLoRA: factors from the base weight, which keeps the residual
            from lorakit.layers.data_init import init_from_base

            init_from_base(self, name, init)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / self.r[name])
        else:
            kaiming_a(self.lora_A[name].weight)
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: a fresh adapter is a no-op

    # ---- DoRA (lorakit.layers.dora holds the arithmetic; LoraLayer merges and routes) -------------------------
    @property
    def weight_in_out(self) -> bool:
        return self.fan_in_fan_out

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)  # a 4-bit base's weight is packed: its shape says nothing

    def base_term(self, x: Tensor) -> Tensor:
        weight = dora.dense_weight(self)
        return F.linear(x.to(weight.dtype), weight.T if self.fan_in_fan_out else weight)

    def delete(self, name: str) -> None:
        super().delete(name)
        self.initial_factors.pop(name, None)

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """``result + scaling * B(A(dropout(x)))``; see `lora_forward` for the training path.

        Inference fast path: ``result += s * (x A^T) B^T`` as one matmul and one in-place ``addmm``, taken only
        without autograd or autocast, with dropout inactive and one dtype throughout; the update then lands in
        the base layer's fresh output instead of costing a scale and an addition kernel more.
        """
        if self.is_dora(name):
            return dora.add(self, result, x, name)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dropout = self.lora_dropout[name]
        if (
            torch.is_grad_enabled()
            or (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0)
            or torch.is_autocast_enabled(x.device.type)
            or not (x.dtype == a.dtype == b.dtype == result.dtype)
            or not result.is_contiguous()
            or result.shape[-1] != b.shape[0]
        ):
            return result + self.lora_forward(x, name).to(result.dtype)
        h = F.linear(x, a).reshape(-1, a.shape[0])  # (n, r)
        result.view(-1, b.shape[0]).addmm_(h, b.t(), alpha=self.scaling[name])
        return result

    def lora_forward(self, x: Tensor, name: str, dropout: bool = True) -> Tensor:
        drop = self.lora_dropout[name]
        p = drop.p if dropout and isinstance(drop, nn.Dropout) and drop.training else 0.0
        # (..., in) -> (..., r) -> (..., out_features); saves x, a bool mask and h only (see lora_function)
        return lora_linear_delta(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def routed_update(self, x: Tensor, names: list[str], idx: Tensor, route) -> Tensor:
        """BGMV-style: gather each row's stacked factors and apply them with two batched matmuls."""
        a_rows, b_rows = row_factors(self, names, idx, route)  # (batch, in, R), (batch, R, out)
        x = routed_dropout(self, x, names, idx)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype)  # (batch, tokens, in)
        h = torch.bmm(flat, a_rows)  # (batch, tokens, R)
        return torch.bmm(h, b_rows).reshape(*x.shape[:-1], -1)  # (..., out)

    def delta_weight(self, name: str) -> Tensor:
        a = self.lora_A[name].weight.float()  # (r, in)
        b = self.lora_B[name].weight.float()  # (out, r)
        delta = (b @ a) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta
