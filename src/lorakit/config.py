"""`LoraConfig`: what to adapt and how, with PEFT's field names and meaning.

The config is a frozen dataclass validated at construction, so a bad value fails where it was written, not
deep inside injection. It round-trips through PEFT's ``adapter_config.json`` (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError, FormatError
from lorakit.ops.inits import check_init, is_data_init

TargetSpec = str | tuple[str, ...] | None

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "pissa_niter_<K>", "olora", "loftq")
_PEFT_ONLY_INITS = ("eva", "corda", "orthogonal", "lora_ga", "mica")

# PEFT config keys we read but whose non-default values we cannot honour: loading such an adapter would silently
# give different outputs, so it is refused instead (key -> the value that means "feature off").
_UNSUPPORTED_FEATURES: dict[str, Any] = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_qalora": False,
    "use_bdlora": None,
}


def default_alpha(r: int) -> float:
    """The ``lora_alpha`` used when none is given: ``2 * r`` (the usual convention; scaling 2 at any rank)."""
    return 2 * r


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The update's scale: ``alpha / r`` (Hu et al. 2021), or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_int(value: Any) -> bool:
    """A true integer (numpy ints too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) and value > 0


def _as_names(value: Any, field_name: str, problems: list[str]) -> TargetSpec:
    """Normalise a module-name spec to None, a regex string or a tuple of names (never the caller's list)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (Sequence, set, frozenset)) and all(isinstance(v, str) for v in value):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        if not names:
            problems.append(f"{field_name}=[] is empty; give module names, a regex string, or None")
        return names
    problems.append(f"{field_name}={value!r} must be a string (regex), a list of module names, or None")
    return None


@dataclass(frozen=True)
class LoraConfig:
    """Configuration of one LoRA adapter (field names and meaning follow PEFT's ``LoraConfig``).

    Args:
        r: Rank of the update ``B A`` (positive int).
        lora_alpha: Scale numerator: the update is multiplied by ``lora_alpha / r``
            (or ``lora_alpha / sqrt(r)`` with ``use_rslora``, Kalajdzievski 2023).
        target_modules: Which modules get LoRA. A list item matches a module whose full dotted name equals it or
            ends with ``"." + item``; a string is a regex that must match the full name; ``"all-linear"`` means
            every linear layer except the output head; None means the attention projections.
        exclude_modules: Modules never adapted (same matching rules as ``target_modules``).
        lora_dropout: Dropout probability applied to the LoRA branch's input.
        fan_in_fan_out: True when the base weight is stored (in, out) like GPT-2's ``Conv1D`` (set automatically).
        bias: "none", "all" (every bias is trained and saved) or "lora_only" (biases of adapted layers).
        use_rslora: Use rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        modules_to_save: Modules trained fully (a copy) and saved with the adapter, e.g. a classifier head.
        init_lora_weights: True (A Kaiming-uniform, B zeros), "gaussian" (A normal(0, 1/r)), False (random B: not
            a no-op, for tests only); "pissa" / "pissa_niter_K" (principal singular vectors, Meng et al. 2024),
            "olora" (QR, Büyükakyüz 2024) and "loftq" (Li et al. 2023) read the base weight and replace it by a
            residual (see `lorakit.ops.inits`).
        use_dora: DoRA (Liu et al. 2024): a learned per-output magnitude times the normalised ``W + s B A``.
        loftq_config: ``{"loftq_bits": 4, "loftq_iter": 1}`` for ``init_lora_weights="loftq"`` (PEFT's keys).
        layers_to_transform: Only adapt these layer indices (list targets only, as in PEFT).
        layers_pattern: Name of the layer container(s) the index follows, e.g. "layers" or "h".
        rank_pattern: Per-module rank overrides ``{regex_suffix: r}``.
        alpha_pattern: Per-module alpha overrides ``{regex_suffix: alpha}``.
        task_type: PEFT task type (e.g. "CAUSAL_LM"), recorded in the adapter config.
        base_model_name_or_path: The base model this adapter was trained on (recorded when saving).
        revision: The Hub revision (branch, tag or commit) of that base model; None means "main" (PEFT loads
            the base at this revision).
        inference_mode: Recorded in the adapter config (PEFT writes True on save).
    """

    r: int = 16
    lora_alpha: float = 32
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    use_dora: bool = False
    loftq_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not is_int(self.r) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer (8-32 is usual)")
        if not _is_positive_number(self.lora_alpha):
            problems.append(f"lora_alpha={self.lora_alpha!r} must be a positive number (2*r is the usual choice)")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, numbers.Real)
            or not 0.0 <= self.lora_dropout < 1.0
        ):
            problems.append(f"lora_dropout={self.lora_dropout!r} must be a number in [0, 1)")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias={self.bias!r} must be one of {BIAS_MODES}")
        self._check_init(problems)
        for name in ("fan_in_fan_out", "use_rslora", "inference_mode", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be True or False")

        set_ = object.__setattr__  # frozen: normalise once, here, on our own copies
        set_(self, "target_modules", _as_names(self.target_modules, "target_modules", problems))
        set_(self, "exclude_modules", _as_names(self.exclude_modules, "exclude_modules", problems))
        mts = _as_names(self.modules_to_save, "modules_to_save", problems)
        if isinstance(mts, str):
            mts = (mts,)
        set_(self, "modules_to_save", mts)
        pattern = _as_names(self.layers_pattern, "layers_pattern", problems)
        set_(self, "layers_pattern", (pattern,) if isinstance(pattern, str) else pattern)
        self._check_layers(problems)
        self._check_patterns(problems)
        self._check_regexes(problems)
        if problems:
            raise ConfigError("Invalid LoraConfig: " + "; ".join(problems) + ".")

    def _check_init(self, problems: list[str]) -> None:
        init = self.init_lora_weights
        if init != "gaussian" and not isinstance(init, bool) and not is_data_init(init):
            hint = " (a PEFT initialisation lorakit does not implement)" if init in _PEFT_ONLY_INITS else ""
            problems.append(check_init(init) or f"init_lora_weights={init!r}{hint} must be one of {INIT_MODES}")
        loftq = self.loftq_config
        if not isinstance(loftq, Mapping) or set(loftq) - {"loftq_bits", "loftq_iter"}:
            problems.append(f"loftq_config={loftq!r} must be a dict with keys 'loftq_bits' (4) and 'loftq_iter'")
            return
        object.__setattr__(self, "loftq_config", dict(loftq))
        if init == "loftq" and loftq.get("loftq_bits", 4) != 4:
            problems.append(f"loftq_config loftq_bits={loftq['loftq_bits']!r}: lorakit's LoftQ is NF4 (4 bits) only")

    def _check_layers(self, problems: list[str]) -> None:
        layers = self.layers_to_transform
        if layers is None:
            return
        if is_int(layers):
            layers = (layers,)
        if not isinstance(layers, Sequence) or not all(is_int(i) and i >= 0 for i in layers):
            problems.append(f"layers_to_transform={self.layers_to_transform!r} must be a layer index or a list of them")
            return
        object.__setattr__(self, "layers_to_transform", tuple(int(i) for i in layers))
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            problems.append(
                "layers_to_transform only applies to list target_modules (as in PEFT); with a regex string, "
                "put the layer indices in the regex instead"
            )

    def _check_regexes(self, problems: list[str]) -> None:
        """Every field read as a regex must compile here, not fail later inside injection."""
        regexes = [(f"{name}=", getattr(self, name)) for name in ("target_modules", "exclude_modules")]
        regexes = [(label, value) for label, value in regexes if isinstance(value, str)]
        regexes += [("layers_pattern item ", p) for p in self.layers_pattern or ()]
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            regexes += [(f"{name} key ", k) for k in value if isinstance(k, str)] if isinstance(value, Mapping) else []
        for label, pattern in regexes:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"{label}{pattern!r} is not a valid regex ({exc})")

    def _check_patterns(self, problems: list[str]) -> None:
        for name, check, what in (
            ("rank_pattern", is_int, "positive integers"),
            ("alpha_pattern", _is_positive_number, "positive numbers"),
        ):
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                problems.append(f"{name}={value!r} must be a dict {{module_regex: value}}")
                continue
            bad = {k: v for k, v in value.items() if not isinstance(k, str) or not check(v) or v <= 0}
            if bad:
                problems.append(f"{name} values must be {what}; got {bad!r}")
            object.__setattr__(self, name, dict(value))

    # ---- scaling -------------------------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` (``rank_pattern`` overrides ``r``)."""
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """Alpha of the adapter on ``module_name`` (``alpha_pattern`` overrides ``lora_alpha``)."""
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for ``module_name``."""
        return lora_scaling(self.rank_for(module_name), self.alpha_for(module_name), self.use_rslora)

    # ---- adapter_config.json -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The PEFT ``adapter_config.json`` dict (PEFT reads it with ``PeftConfig.from_pretrained``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["rank_pattern"] = dict(self.rank_pattern)
        out["alpha_pattern"] = dict(self.alpha_pattern)
        out["loftq_config"] = dict(self.loftq_config)
        out["peft_type"] = "LORA"
        out.update({k: v for k, v in _UNSUPPORTED_FEATURES.items()})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "adapter config") -> LoraConfig:
        """Build a config from a PEFT ``adapter_config.json`` dict, refusing features lorakit cannot honour."""
        if not isinstance(data, Mapping):
            raise FormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise FormatError(f"{source}: peft_type={peft_type!r}; lorakit reads LoRA adapters only (peft_type 'LORA')")
        used = {
            k: v
            for k, v in data.items()
            if k in _UNSUPPORTED_FEATURES and v not in (_UNSUPPORTED_FEATURES[k], None, False, [], {})
        }
        if used:
            raise FormatError(f"{source}: uses PEFT features lorakit does not implement: {used}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise FormatError(f"{source}: {exc}") from exc


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """First pattern whose regex matches a dotted suffix of ``module_name`` (PEFT's rule), else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default
