"""The Redis side of the pipeline, shared by gateway and worker: nothing else holds a Redis client."""

from breakwater.broker.broker import Broker
from breakwater.broker.connection import connect, connect_with, redacted
from breakwater.broker.dead_letters import DeadLetter
from breakwater.broker.fanin import Fanin, GatewayDraining, Subscription
from breakwater.broker.ledger import Billing
from breakwater.broker.record import RequestRecord, RequestSpec, Status, Watch
from breakwater.broker.types import (
    Admission,
    Append,
    EnqueueResult,
    Fence,
    Job,
    Lease,
    StartOutcome,
    StartResult,
)

__all__ = [
    "Admission",
    "Append",
    "Billing",
    "Broker",
    "DeadLetter",
    "EnqueueResult",
    "Fanin",
    "Fence",
    "GatewayDraining",
    "Job",
    "Lease",
    "RequestRecord",
    "RequestSpec",
    "StartOutcome",
    "StartResult",
    "Status",
    "Subscription",
    "Watch",
    "connect",
    "connect_with",
    "redacted",
]
