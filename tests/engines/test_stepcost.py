"""The step-cost fit a worker keeps of its engine (``engines.stepcost``): the three costs back from
steps that vary, the full-batch decode cost when the batch never varies, nothing before enough
steps, and a rating that is 1 / (o x (base / slots + per_seq) + q x per_prompt_token)."""

from __future__ import annotations

import random

import pytest

from breakwater.engines.stepcost import MIN_STEPS, Rating, StepCost, StepFit

TRUE = StepCost(base_s=0.020, per_seq_s=0.0005, per_prompt_token_s=0.00005)


def _step(rng: random.Random, running: int, prompt: int, noise: float = 0.05) -> float:
    exact = TRUE.base_s + TRUE.per_seq_s * running + TRUE.per_prompt_token_s * prompt
    return exact * (1 + rng.uniform(-noise, noise))


def _feed(fit: StepFit, steps: list[tuple[int, int]], rng: random.Random, noise: float = 0.05) -> None:
    for running, prompt in steps:
        fit.add(_step(rng, running, prompt, noise), running, prompt)


def test_the_fit_recovers_known_costs() -> None:
    rng = random.Random(7)
    fit = StepFit()
    _feed(fit, [(rng.randint(1, 32), rng.choice([0, 0, 0, 512, 2048])) for _ in range(3000)], rng)
    cost = fit.cost()
    assert cost is not None
    assert cost.base_s == pytest.approx(TRUE.base_s, rel=0.05)
    assert cost.per_seq_s == pytest.approx(TRUE.per_seq_s, rel=0.10)
    assert cost.per_prompt_token_s == pytest.approx(TRUE.per_prompt_token_s, rel=0.05)


def test_a_batch_that_never_varies_still_gives_its_decode_cost() -> None:
    """A worker kept full (32 running every step): base and per-sequence cannot be told apart, but
    the decode cost per token at that batch, what the rating needs, is exact."""
    rng = random.Random(3)
    fit = StepFit(slots=32)
    _feed(fit, [(32, rng.choice([0, 0, 0, 2048])) for _ in range(2000)], rng, noise=0.0)
    cost = fit.cost()
    assert cost is not None
    assert cost.job_s(32, 100, 0) == pytest.approx(TRUE.job_s(32, 100, 0), rel=1e-6)
    assert cost.per_prompt_token_s == pytest.approx(TRUE.per_prompt_token_s, rel=1e-6)
    assert cost.jobs_per_s(32, 100, 2048) == pytest.approx(TRUE.jobs_per_s(32, 100, 2048), rel=1e-6)


def test_a_batch_that_never_varies_far_below_the_slots_gives_nothing() -> None:
    """One sequence at a time on a 32-slot engine: whether 32 would cost 32 times as much or
    hardly more is not in the data, so no rating (Little's law sizes the fleet instead)."""
    rng = random.Random(4)
    fit = StepFit(slots=32)
    _feed(fit, [(1, rng.choice([0, 0, 0, 2048])) for _ in range(2000)], rng)
    assert fit.cost() is None


def test_steps_without_prefill_count_it_as_zero() -> None:
    rng = random.Random(5)
    fit = StepFit()
    _feed(fit, [(rng.randint(1, 32), 0) for _ in range(1000)], rng, noise=0.0)
    cost = fit.cost()
    assert cost is not None
    assert (cost.base_s, cost.per_seq_s, cost.per_prompt_token_s) == pytest.approx(
        (TRUE.base_s, TRUE.per_seq_s, 0.0), rel=1e-6, abs=1e-12
    )


def test_nothing_before_enough_steps() -> None:
    rng = random.Random(1)
    fit = StepFit()
    _feed(fit, [(rng.randint(1, 32), rng.choice([0, 2048])) for _ in range(int(MIN_STEPS) - 1)], rng)
    assert fit.cost() is None
    _feed(fit, [(rng.randint(1, 32), rng.choice([0, 2048])) for _ in range(5)], rng)
    assert fit.cost() is not None


def test_the_fit_follows_an_engine_that_changed() -> None:
    """Old steps fade (half-life 4000 steps): after 20,000 steps of an engine twice as slow, the
    fit reads the new cost."""
    rng = random.Random(9)
    fit = StepFit()
    _feed(fit, [(rng.randint(1, 32), rng.choice([0, 0, 2048])) for _ in range(5000)], rng)
    for _ in range(20_000):
        running, prompt = rng.randint(1, 32), rng.choice([0, 0, 2048])
        fit.add(2 * _step(rng, running, prompt), running, prompt)
    cost = fit.cost()
    assert cost is not None
    assert cost.job_s(32, 200, 1000) == pytest.approx(2 * TRUE.job_s(32, 200, 1000), rel=0.05)


def test_a_rating_is_the_jobs_a_full_worker_finishes() -> None:
    rng = random.Random(2)
    rating = Rating(slots=32)
    _feed(rating.fit, [(rng.randint(1, 32), rng.choice([0, 0, 2048])) for _ in range(500)], rng, noise=0.0)
    assert rating.jobs_per_s() is None  # no job finished yet: no lengths
    for _ in range(50):
        rating.finished(prompt_tokens=2048, output_tokens=64)
    # 64 x (20 ms / 32 + 0.5 ms) + 2048 x 0.05 ms = 72 ms + 102.4 ms per job
    assert rating.jobs_per_s() == pytest.approx(1 / (64 * (0.020 / 32 + 0.0005) + 2048 * 0.00005), rel=1e-6)
    # Lengths are a moving mean: shorter jobs move it towards their rate.
    for _ in range(200):
        rating.finished(prompt_tokens=100, output_tokens=64)
    assert rating.jobs_per_s() == pytest.approx(1 / (64 * (0.020 / 32 + 0.0005) + 100 * 0.00005), rel=0.01)


def test_a_few_noisy_steps_far_below_the_slots_are_not_extrapolated() -> None:
    """60 steps of 1-3 sequences with 10% noise on a 32-slot engine put a full batch's cost
    anywhere from 0.7x to 1.6x (a review's trial): no rating. Enough steps pin even that
    extrapolation down (its standard error shrinks with them), and then the rating is right."""
    rng = random.Random(11)
    fit = StepFit(slots=32)
    _feed(fit, [(rng.randint(1, 3), rng.choice([0, 0, 2048])) for _ in range(60)], rng, noise=0.10)
    assert fit.cost() is None
    _feed(fit, [(rng.randint(1, 3), rng.choice([0, 0, 2048])) for _ in range(6000)], rng, noise=0.10)
    cost = fit.cost()
    assert cost is not None
    assert cost.job_s(32, 64, 2048) == pytest.approx(TRUE.job_s(32, 64, 2048), rel=0.10)


def test_embeddings_do_not_move_the_lengths() -> None:
    """An embedding finishes with no output tokens; counted, a first one would set the mean output
    to 0 and rate the worker ~20x too high for the next sixty jobs."""
    rating = Rating(slots=32)
    rating.finished(prompt_tokens=500, output_tokens=0)
    rating.finished(prompt_tokens=100, output_tokens=64)
    assert (rating.prompt_tokens, rating.output_tokens, rating.jobs) == (100.0, 64.0, 1)
