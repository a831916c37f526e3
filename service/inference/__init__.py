"""The online path, request → batch → flow → response: the protocol layer, the model cache, the
batcher and the forward pass."""

from .batcher import Batcher, BatcherConfig, Pending
from .cache import LoadedModel, ModelCache
from .forward import forward
from .protocol import Answer, Call, DataPlane

__all__ = ["DataPlane", "Call", "Answer", "ModelCache", "LoadedModel", "Batcher", "BatcherConfig",
           "Pending", "forward"]
