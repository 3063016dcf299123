"""`ModulesToSave`: a module trained in full (a per-adapter copy) and saved with the adapter, e.g. a new head."""

from __future__ import annotations

import copy

from torch import nn

from lorakit.errors import RoutingError
from lorakit.routing import current_route


class ModulesToSave(nn.Module):
    """Keeps the original at ``.original_module`` and one trainable copy per adapter in ``.modules_to_save``.

    The names match PEFT's in-memory layout, so the adapter keys are ``<path>.modules_to_save.<name>.<param>``.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.train(original_module.training)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        """Make a trainable copy of the original module for adapter ``name``."""
        clone = copy.deepcopy(self.original_module)
        clone.train(self.training)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def current(self) -> nn.Module:
        """The module forward runs: the routed adapter's copy, the first active adapter's, else the original."""
        if self.disable_adapters:
            return self.original_module
        route = current_route()
        if route is not None:
            choices = {n if n in self.modules_to_save else None for n in route.rows}
            if len(choices) > 1:
                raise RoutingError(
                    "rows are routed to different trained copies of a modules_to_save module "
                    f"({sorted(map(str, choices))})"
                    "; per-row routing covers LoRA layers only: route these rows in separate batches"
                )
            (choice,) = choices
            return self.original_module if choice is None else self.modules_to_save[choice]
        if not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes model code reads from the module it thinks it has (``head.weight``) come from `current`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "active_adapters" not in self.__dict__:  # mid-__init__ or unpickling
                raise
            return getattr(self.current(), name)
