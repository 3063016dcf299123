"""One exception hierarchy for everything lorakit raises on bad input or bad files.

Every message says what was given, what was expected and how to fix it, so the CLI can print it as one line.
"""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid (raised at construction, never later)."""


class TargetNotFoundError(LorakitError):
    """`target_modules` (or another module pattern) matched nothing in the model."""


class AdapterNotFoundError(LorakitError, KeyError):
    """An adapter name that is not loaded on the model was used."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(LorakitError):
    """An adapter name that is already loaded was used for a new adapter."""


class IncompatibleAdapterError(LorakitError):
    """An adapter's tensors do not fit the model (shapes, missing layers, other base)."""


class MergeError(LorakitError):
    """A merge or unmerge cannot be done (e.g. unmerging something that was never merged)."""


class FormatError(LorakitError):
    """A file on disk is missing, corrupt or not in the expected format."""


class ModelNotFoundError(LorakitError):
    """A model name or path could not be resolved to loadable weights."""


class DataError(LorakitError):
    """Training or evaluation data is missing, empty or malformed."""


class RoutingError(LorakitError, ValueError):
    """A per-row adapter route does not fit the batch or the model."""


class HubError(LorakitError):
    """A Hugging Face Hub repository could not be fetched (gated, missing, no network, offline and not cached)."""
