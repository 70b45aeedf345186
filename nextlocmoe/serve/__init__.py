"""Inference from raw records on an engine folder: ``Predictor`` (Python API), ``nextlocmoe predict``,
``nextlocmoe serve`` (HTTP JSON). See docs/SERVING.md."""

from nextlocmoe.serve.engine import EngineError, load_engine
from nextlocmoe.serve.history import RequestError

__all__ = ["EngineError", "RequestError", "load_engine"]
