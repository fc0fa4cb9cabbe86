"""The serving engine: paged KV blocks, a continuous-batching scheduler, schedule -> execute -> update."""

from lmforge.engine.engine import Engine
from lmforge.engine.loop import EngineLoop, RequestStream
from lmforge.engine.sequence import RequestOutput

__all__ = ["Engine", "EngineLoop", "RequestOutput", "RequestStream"]
