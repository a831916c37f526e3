"""One router per resource; ``service.api.app.create_app`` registers them in one list."""

from . import datasets, health, inference, jobs, models

__all__ = ["datasets", "health", "inference", "jobs", "models"]
