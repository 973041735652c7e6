"""Errors the engine raises for bad requests (adapter errors live in adapters_store)."""


class RequestError(ValueError):
    """A row that cannot run: unknown adapter, empty or too long input, bad token ids."""
