"""duomo as a service: OpenAI-compatible embeddings, zero-shot classification, image search, a web page."""

from duomo.serve.app import create_app
from duomo.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from duomo.serve.settings import ServeSettings

__all__ = ["BatcherClosedError", "DynamicBatcher", "QueueFullError", "ServeSettings", "create_app"]
