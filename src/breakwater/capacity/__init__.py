"""Capacity: a discrete-event simulator of a Breakwater fleet under autoscaling policies, driven by
request traces, and the cost model that prices its runs (issue #18; docs/evaluation.md)."""
