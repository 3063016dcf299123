"""Fast inference: a static-cache decode engine over packed base weights, adapters kept separate per row."""

from lorakit.inference.engine import DecodeEngine
from lorakit.inference.generate import generate
from lorakit.inference.llama import unsupported_reason
from lorakit.inference.weights import WEIGHT_FORMATS

__all__ = ["WEIGHT_FORMATS", "DecodeEngine", "generate", "unsupported_reason"]
