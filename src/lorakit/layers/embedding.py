"""LoRA for ``nn.Embedding``: the low-rank update is a (num_embeddings, dim) table ``(B A)^T``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.routed import stacked_factors


class LoraEmbedding(LoraLayer):
    """``y = E[x] + scaling * (A^T)[x] B^T`` with ``A: (r, num_embeddings)``, ``B: (dim, r)``.

    PEFT's layout and names (``lora_embedding_A`` / ``lora_embedding_B`` as bare parameters) are kept so the
    saved keys match. The input is token ids, so there is no dropout on this branch.

    A DoRA adapter has a magnitude ``m: (dim,)``, one per embedding dimension: as in PEFT, the table is read as a
    ``(num_embeddings, dim)`` = ``(in, out)`` weight, so ``y = g * (E[x] + s (A^T)[x] B^T)`` with
    ``g = m / ||E + s (B A)^T||`` taken over all tokens for each dimension.
    """

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    dropout_on_input = False

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()  # adapter -> (r, num_embeddings)
        self.lora_embedding_B = nn.ParameterDict()  # adapter -> (embedding_dim, r)

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.embedding_dim, r, dtype=dtype, device=device))

    @torch.no_grad()
    def _init_factors(self, name: str, init: bool | str) -> None:
        # As in PEFT: A (the table indexed by token) starts at zero and B is normal, so the update is a no-op.
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        nn.init.normal_(b)
        if init is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)

    @property
    def weight_in_out(self) -> bool:
        return True  # (num_embeddings, dim): tokens play the inputs, dimensions the outputs

    def lora_forward(self, x: Tensor, name: str, dropout: bool = True) -> Tensor:
        base = self.base_layer
        rows = F.embedding(  # (..., r)
            x,
            self.lora_embedding_A[name].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        return (rows @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def routed_update(self, x: Tensor, names: list[str], idx: Tensor, route) -> Tensor:
        """Each row looks up its own adapter's rows of the stacked ``A^T`` tables, then one batched matmul."""
        a_t, b_t = stacked_factors(self, names)  # (k+1, num_embeddings, R), (k+1, R, dim)
        flat = x.reshape(x.shape[0], -1)  # (batch, tokens) of token ids
        h = a_t[idx[:, None], flat]  # (batch, tokens, R): each row looks up only its own adapter's table
        return torch.bmm(h, b_t[idx]).reshape(*x.shape, -1)  # (..., dim)

    def delta_weight(self, name: str) -> Tensor:
        a = self.lora_embedding_A[name].float()  # (r, num_embeddings)
        b = self.lora_embedding_B[name].float()  # (dim, r)
        return (b @ a).T * self.scaling[name]  # (num_embeddings, dim)
