"""The package's error types for bad input, importable without torch (a job's driver catches
them before it has loaded any model)."""


class ArtifactError(ValueError):
    """The artifact is missing, truncated, foreign or from a newer version; names the file."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found or fetched; the message says how to provide them."""


class RegistryError(RuntimeError):
    """The model registry cannot be reached, or has no such product, version or alias."""
