"""One router per resource; ``service.app.create_app`` registers them in one list."""

from . import health, inference, models

__all__ = ["health", "inference", "models"]
