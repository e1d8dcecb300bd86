"""The worker: pulls jobs while its engine has room, runs them, publishes every step's tokens."""

from breakwater.worker.worker import Worker

__all__ = ["Worker"]
