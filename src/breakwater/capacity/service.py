"""What one replica (a worker and its engine) can do: its service curve."""

from __future__ import annotations

from dataclasses import dataclass

from breakwater.engines.options import SimOptions


@dataclass(frozen=True, slots=True)
class ServiceCurve:
    """Continuous batching up to ``capacity`` sequences: one engine step decodes a token for every
    running sequence and costs ``decode_base_s + decode_per_seq_s * batch``, plus the prefill of the
    sequences that join it (``prefill_s_per_token`` per prompt token). This is the ``sim`` engine's
    own cost model, so the simulator and a real stack of sim workers run the same curve; for a real
    engine, fit it to measured step times (``benchmarks/engines.py``).

    ``max_batched_tokens`` (0: none, as the sim engine) bounds the prompt tokens that join one step,
    as vLLM's scheduler does (``max_num_batched_tokens``): sequences join while the budget lasts
    (the first one always), the others wait for the next step."""

    capacity: int
    decode_base_s: float
    decode_per_seq_s: float = 0.0
    prefill_s_per_token: float = 0.0
    max_batched_tokens: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 1 or min(self.decode_base_s, self.decode_per_seq_s, self.prefill_s_per_token) < 0:
            raise ValueError("a service curve needs capacity >= 1 and non-negative step costs")
        if self.decode_base_s + self.decode_per_seq_s <= 0:
            raise ValueError("a decode step must take some time")

    def step_s(self, batch: int, prefill_tokens: int = 0) -> float:
        return self.decode_base_s + self.decode_per_seq_s * batch + self.prefill_s_per_token * prefill_tokens

    @classmethod
    def of_sim(cls, options: SimOptions) -> ServiceCurve:
        return cls(
            capacity=options.capacity,
            decode_base_s=options.decode_base_ms / 1000,
            decode_per_seq_s=options.decode_per_seq_ms / 1000,
            prefill_s_per_token=options.prefill_ms_per_token / 1000,
        )


# The simulator's illustrative replica (the sim engine's shape, GPU-like step times) with vLLM's
# default prefill budget per step: what the policy and occupancy studies run (benchmarks/).
ILLUSTRATIVE = ServiceCurve(
    capacity=32,
    decode_base_s=0.020,
    decode_per_seq_s=0.0005,
    prefill_s_per_token=0.00005,
    max_batched_tokens=8192,
)


# Llama-3-8B (BF16) on one H100 under vLLM 0.6 (256 sequences, max_num_batched_tokens = the
# model's 8192-token context), fitted by hand from published numbers, about +/-30%: vLLM's
# performance benchmark latency at batch 8 (997.5 ms for 128 output tokens: 7.8 ms a step), the
# LambdaLabs vLLM benchmark (8,088 output tokens/s at 256 sequences, ShareGPT), the vLLM v0.6.0
# blog's prefill-heavy throughput. Sources and arithmetic: docs/evaluation.md, "A GPU curve from
# published numbers".
H100_LLAMA3_8B = ServiceCurve(
    capacity=256,
    decode_base_s=0.0073,
    decode_per_seq_s=0.00006,
    prefill_s_per_token=0.000033,
    max_batched_tokens=8192,
)

CURVES = {"illustrative": ILLUSTRATIVE, "h100-llama3-8b": H100_LLAMA3_8B}
