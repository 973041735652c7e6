"""The one error type of adapters_store: a bad adapter, named with its file, tensor and problem."""


class AdapterError(ValueError):
    """An adapter that cannot be used: unreadable, malformed, or not fitting the base model."""
