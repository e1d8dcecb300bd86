"""The Redis side of the pipeline, shared by gateway and worker."""

from breakwater.broker.broker import Broker, EnqueueResult, Job, StartResult
from breakwater.broker.connection import connect, connect_with, redacted

__all__ = ["Broker", "EnqueueResult", "Job", "StartResult", "connect", "connect_with", "redacted"]
