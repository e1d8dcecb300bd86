"""The OpenAI request types: bounds that keep bad input a 400, and unsupported parameters named."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from breakwater.protocol.openai import (
    MAX_CHOICES,
    MAX_GROUP,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout", float("inf")),
        ("timeout", float("nan")),
        ("timeout", 86_401),
        ("temperature", float("nan")),
        ("max_tokens", 1 << 31),
        ("seed", 1 << 63),
        ("stop", ["x" * (MAX_STOP_CHARS + 1)]),
        ("stop", ""),
        ("n", MAX_CHOICES + 1),
        ("n", 0),
        ("messages", [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)),
    ],
)
def test_out_of_bounds_values_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(_chat(**{field: value}))
    assert info.value.errors()[0]["loc"][0] == field


def test_bounds_themselves_are_accepted() -> None:
    body = ChatCompletionRequest.model_validate(
        _chat(timeout=86_400, max_tokens=(1 << 31) - 1, seed=-(1 << 63), stop=["x" * MAX_STOP_CHARS])
    )
    assert body.timeout == 86_400 and body.stop_list() == ["x" * MAX_STOP_CHARS]


@pytest.mark.parametrize(
    ("prompt", "n", "choices"),
    [("one", 3, 3), (["one"], 1, 1), (["a", "b"], 2, 4), (["p"] * MAX_GROUP, 1, MAX_GROUP)],
)
def test_a_text_completion_has_n_choices_for_each_prompt(prompt: Any, n: int, choices: int) -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": prompt, "n": n})
    assert body.choice_count() == choices


@pytest.mark.parametrize(
    ("prompt", "n"), [([], 1), (["p"] * (MAX_GROUP + 1), 1), (["p"] * 17, 4), ([1, 2, 3], 1)]
)
def test_too_many_or_no_prompts_are_refused_naming_prompt(prompt: Any, n: int) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": prompt, "n": n})
    assert info.value.errors()[0]["loc"][0] == "prompt"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"guided_json": {}}, "guided_json"),
        ({}, None),
        ({"logprobs": False, "presence_penalty": 0, "tool_choice": "none", "metadata": {"a": "b"}}, None),
        ({"top_k": 40, "store": False, "response_format": {"type": "text"}}, None),
        ({"store": True}, "store"),  # nothing is stored to be retrieved later: refused, not ignored
        ({"service_tier": "auto"}, None),
        ({"service_tier": "default"}, None),
        ({"service_tier": "priority"}, "service_tier"),
        ({"service_tier": "flex"}, "service_tier"),
    ],
)
def test_unsupported_parameter_is_named(extra: dict[str, Any], named: str | None) -> None:
    assert ChatCompletionRequest.model_validate(_chat(**extra)).unsupported_parameter() == named


@pytest.mark.parametrize("top_k", [2.5, -2, "5", True])
def test_a_top_k_that_is_none_is_an_invalid_value_of_its_own_field(top_k: Any) -> None:
    """A typed field (vLLM's extension): a bad one is invalid, not an unsupported parameter."""
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(_chat(top_k=top_k))
    assert info.value.errors()[0]["loc"] == ("top_k",)


def test_response_format_is_a_chat_parameter_only() -> None:
    """Chat checks it (protocol.formats); OpenAI's text completions have none: named and refused."""
    chat = ChatCompletionRequest.model_validate(_chat(response_format={"type": "json_object"}))
    assert chat.unsupported_parameter() is None and chat.response_format == {"type": "json_object"}
    body = {"model": "m", "prompt": "p", "response_format": {"type": "json_object"}}
    assert CompletionRequest.model_validate(body).unsupported_parameter() == "response_format"
    for name, value in (("tools", [{"type": "function"}]), ("parallel_tool_calls", True)):
        completion = CompletionRequest.model_validate({"model": "m", "prompt": "p", name: value})
        assert completion.unsupported_parameter() == name  # chat-only in OpenAI's API


def test_completion_parameters() -> None:
    assert (
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "best_of": 1}).unsupported_parameter()
        is None
    )
    assert (
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "suffix": "x"}).unsupported_parameter()
        == "suffix"
    )
    with_logprobs = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 2})
    assert with_logprobs.unsupported_parameter() is None and with_logprobs.logprobs_top() == 2  # served now
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p"}).logprobs_top() == -1


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ],
)
def test_sampling_penalties_and_biases_are_bounded(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(_chat(**extra))
    assert info.value.errors()[0]["loc"][0] == field


def test_penalties_and_biases_are_the_engines_to_serve() -> None:
    """Typed fields now (the engines that serve them say so in their features: gateway.specs)."""
    body = ChatCompletionRequest.model_validate(
        _chat(presence_penalty=-2, frequency_penalty=2, logit_bias={"7": -100, "42": 0, "9": 100})
    )
    assert body.unsupported_parameter() is None
    assert body.token_biases() == {7: -100.0, 9: 100.0}  # a bias of 0 asks nothing
