"""polyhead serving: the Engine (one frozen base, many adapters, one batched forward)."""
from .engine import Engine, Request, Result
from .errors import RequestError

__all__ = ["Engine", "Request", "Result", "RequestError"]
