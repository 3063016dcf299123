"""Hugging Face Hub ids: recognize them, fetch a repository's files into the HF cache, explain failures in one line.

Downloads go through ``huggingface_hub.snapshot_download``, so they land in the user's Hugging Face cache
(``HF_HUB_CACHE`` / ``HF_HOME``, default ``~/.cache/huggingface/hub``) with its progress bars, and a second
load of the same revision reads the cache without requesting any file. The environment is read at call time:
``HF_ENDPOINT`` (a mirror), ``HF_TOKEN`` (else the token of ``hf auth login``), ``HF_HUB_OFFLINE=1`` (cache
only, never the network).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lorakit.errors import HubError

__all__ = [
    "ADAPTER_FILES",
    "MODEL_FILES",
    "base_key",
    "fetch_adapter",
    "fetch_model",
    "hub_id_from_cache_path",
    "is_hub_id",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")
# What a causal LM needs from its repository (root files only): config, tokenizer, chat template, safetensors.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
_MODEL_SKIP = ("*/*", "consolidated*", "adapter_*")
_BIN_FILES = ("pytorch_model*.bin",)  # only when a repository has no safetensors weights
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(text: str) -> bool:
    """True for text shaped like a Hub repository id (``Org/Name``); says nothing about whether it exists."""
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not text.lower().endswith(".gguf")


def base_key(name: str) -> str:
    """What two base-model names are compared by: the last path part, lower-cased.

    ``HuggingFaceTB/SmolLM2-135M-Instruct``, lorakit's older ``smollm2-135m-instruct`` and a local copy in
    ``/models/SmolLM2-135M-Instruct`` name the same model; ``Org/Other`` does not.
    """
    return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value right now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def cache_dir() -> Path:
    """The Hugging Face hub cache folder the environment names now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_id_from_cache_path(path: Path) -> str | None:
    """``Org/Name`` for a folder inside the HF cache (``.../models--Org--Name/snapshots/<sha>``), else None."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org_name = parts[-3].removeprefix("models--").split("--", 1)
        return "/".join(org_name) if len(org_name) == 2 else None
    return None


def fetch_model(repo_id: str, revision: str | None = None) -> Path:
    """Downloads (or finds in the HF cache) what a causal LM needs; returns the snapshot folder.

    Safetensors weights are preferred; ``pytorch_model*.bin`` files are fetched only when the repository has
    no ``*.safetensors``.

    Raises:
        HubError: gated, missing, unknown revision, no network, or offline and not cached (one line each).
    """
    folder = _snapshot(repo_id, revision, MODEL_FILES, _MODEL_SKIP, "model")
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo_id, revision, _BIN_FILES, ("*/*",), "model")
    return folder


def fetch_adapter(repo_id: str, revision: str | None = None) -> Path:
    """Downloads (or finds in the HF cache) a PEFT-format adapter repository; returns the snapshot folder."""
    return _snapshot(repo_id, revision, ADAPTER_FILES, ("*/*",), "adapter")


def _snapshot(repo_id: str, revision: str | None, allow: tuple[str, ...], skip: tuple[str, ...], what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"Loading {repo_id!r} from the Hub needs huggingface_hub: pip install 'lorakit[hf]'") from e
    kwargs: dict[str, Any] = {
        "revision": revision,
        "cache_dir": str(cache_dir()),
        "allow_patterns": list(allow),
        "ignore_patterns": list(skip),
        "local_files_only": offline(),
    }
    if os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types; each becomes one clear line
        raise HubError(explain(e, repo_id, revision, what)) from e


def explain(error: BaseException, repo_id: str, revision: str | None, what: str = "model") -> str:
    """One line that names the repository, what went wrong and the fix, for a huggingface_hub failure."""
    from huggingface_hub import errors

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    at = f"{repo_id}@{revision}" if revision else repo_id
    status = getattr(getattr(error, "response", None), "status_code", None)
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    if isinstance(error, errors.GatedRepoError):
        return (
            f"Cannot download the {what} {at}: it is a gated repository ({status}, {token}). Accept its terms on "
            f"{endpoint}/{repo_id}, then set HF_TOKEN=<a token with access> or run `hf auth login`."
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return (
            f"The {what} repository {repo_id} has no revision {revision!r} on {endpoint}: pass a branch, tag or "
            f"commit sha that exists (--revision), or omit it for 'main'."
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return (
            f"The {what} {at} was not found on {endpoint} ({status}): check the id (Org/Name, case matters); if "
            f"it is private, set HF_TOKEN or run `hf auth login` ({token}); a local folder of that name does not exist."
        )
    if offline():
        return (
            f"The {what} {at} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it: unset HF_HUB_OFFLINE, or fetch it once online (`hf download {repo_id}`)."
        )
    if isinstance(error, errors.HfHubHTTPError) and status is not None:
        first = str(error).splitlines()[0]
        return f"The Hub at {endpoint} answered {status} for the {what} {at}: {first}. Try again later."
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"Cannot reach the Hub at {endpoint} to download the {what} {at}, and it is not in the Hugging Face cache "
        f"({cache_dir()}): {first}. Check the network or proxy (HF_ENDPOINT for a mirror), or download it where "
        f"there is network and copy the cache; with HF_HUB_OFFLINE=1 only cached files are used."
    )
