"""``lorakit serve``: one base model, many adapters, mixed-adapter batching behind an OpenAI-compatible API.

``registry`` loads adapters on demand (LRU), ``batcher`` runs continuous batching with per-row adapters
(`lorakit.route`) and a KV cache, ``app`` is the HTTP layer (FastAPI + uvicorn, imported lazily).
"""

from lorakit.serve.batcher import Batcher, GenRequest, SamplingParams
from lorakit.serve.registry import AdapterRegistry

__all__ = ["AdapterRegistry", "Batcher", "GenRequest", "SamplingParams"]
