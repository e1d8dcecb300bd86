"""Engine options: each default lives in its engine's options type, and settings reach it unchanged."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import pytest

from breakwater.config import WorkerSettings
from breakwater.engines import (
    ENGINES,
    EngineOptions,
    LlamaCppOptions,
    SimOptions,
    UpstreamOptions,
    VLLMOptions,
    build_engine,
    options_from_settings,
)
from breakwater.engines.llamacpp import LlamaCppEngine
from breakwater.engines.sim import SimEngine
from breakwater.engines.upstream import OpenAIUpstreamEngine
from breakwater.engines.vllm import VLLMEngine
from breakwater.sim_settings import SimServerSettings

ENGINE_KNOBS = (
    "model",
    "model_path",
    "capacity",
    "context_length",
    "n_threads",
    "n_batch",
    "upstream_url",
    "upstream_model",
    "upstream_api_key",
    "upstream_api_key_file",
    "upstream_metrics_url",
    "upstream_max_waiting",
    "upstream_kv_high",
    "upstream_pull_burst",
    "upstream_wait_s",
    "upstream_read_timeout_s",
    "stream_window_share",
    "sim_prefill_ms_per_token",
    "sim_decode_base_ms",
    "sim_decode_per_seq_ms",
    "sim_jitter_frac",
    "sim_hang_marker",
    "vllm_tool_parser",
    "vllm_chat_template",
)
URL = "http://127.0.0.1:8001/v1"


@pytest.fixture(autouse=True)
def _no_breakwater_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("BREAKWATER_"):
            monkeypatch.delenv(name)


def test_worker_settings_leave_every_engine_knob_to_the_engine() -> None:
    settings = WorkerSettings()
    assert {name: getattr(settings, name) for name in ENGINE_KNOBS} == dict.fromkeys(ENGINE_KNOBS)
    assert settings.vllm_args == {}


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ("sim", SimOptions()),
        ("llamacpp", LlamaCppOptions()),
        ("openai", UpstreamOptions(url=URL)),
        ("vllm", VLLMOptions()),
    ],
)
def test_default_settings_give_the_options_types_defaults(engine: str, expected: EngineOptions) -> None:
    url = URL if engine == "openai" else None
    assert options_from_settings(WorkerSettings(engine=engine, upstream_url=url)) == expected


def test_engines_take_their_options_and_define_no_defaults_of_their_own() -> None:
    for cls, options_type in [
        (SimEngine, SimOptions),
        (LlamaCppEngine, LlamaCppOptions),
        (OpenAIUpstreamEngine, UpstreamOptions),
        (VLLMEngine, VLLMOptions),
    ]:
        params = inspect.signature(cls).parameters.values()
        assert [(p.name, p.annotation) for p in params] in (
            [("options", options_type.__name__)],
            [("options", f"{options_type.__name__} | None")],
        ), cls


def test_llamacpp_capacity_is_one_number_everywhere() -> None:
    options = options_from_settings(WorkerSettings(engine="llamacpp", model_path="/models/tiny.gguf"))
    assert isinstance(options, LlamaCppOptions)
    engine = build_engine(options)  # loads nothing until start()
    assert isinstance(engine, LlamaCppEngine)
    assert engine.info.capacity == engine.capacity == LlamaCppOptions.capacity == 8
    assert (engine.info.model, engine.n_batch) == ("tiny", LlamaCppOptions.n_batch)
    assert f"llamacpp {LlamaCppOptions.capacity}," in str(WorkerSettings.model_fields["capacity"].description)


def test_environment_variables_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREAKWATER_SIM_DECODE_BASE_MS", "0")
    monkeypatch.setenv("BREAKWATER_SIM_HANG_MARKER", "<<hang>>")
    monkeypatch.setenv("BREAKWATER_CAPACITY", "3")
    engine = build_engine(options_from_settings(WorkerSettings()))
    assert isinstance(engine, SimEngine)
    assert engine.hang_marker == "<<hang>>" and engine.info.capacity == 3
    assert engine.options == SimOptions(capacity=3, decode_base_ms=0.0, hang_marker="<<hang>>")

    monkeypatch.setenv("BREAKWATER_ENGINE", "openai")
    monkeypatch.setenv("BREAKWATER_UPSTREAM_URL", "http://up:8001")
    monkeypatch.setenv("BREAKWATER_UPSTREAM_READ_TIMEOUT_S", "7.5")
    monkeypatch.setenv("BREAKWATER_UPSTREAM_WAIT_S", "0")
    monkeypatch.setenv("BREAKWATER_STREAM_WINDOW_SHARE", "0")
    upstream = build_engine(options_from_settings(WorkerSettings()))
    assert isinstance(upstream, OpenAIUpstreamEngine)
    assert upstream.gaps.share == 0.0
    assert (upstream.base_url, upstream.read_timeout_s, upstream.wait_ready_s) == (
        "http://up:8001/v1",
        7.5,
        0.0,
    )
    assert (upstream.capacity, upstream.kv_high) == (3, UpstreamOptions.kv_high)

    monkeypatch.setenv("BREAKWATER_ENGINE", "vllm")
    monkeypatch.setenv("BREAKWATER_VLLM_ARGS", '{"tensor_parallel_size": 2}')
    vllm = build_engine(options_from_settings(WorkerSettings()))
    assert isinstance(vllm, VLLMEngine)
    assert vllm.engine_args == {"tensor_parallel_size": 2} and vllm.info.context_length == 2048
    assert vllm.gaps.share == 0.0  # BREAKWATER_STREAM_WINDOW_SHARE, set above
    assert vllm.tool_format == "smollm2"  # the bundled SmolLM2: the gateway's parser, enforced
    monkeypatch.setenv("BREAKWATER_VLLM_TOOL_PARSER", "hermes")
    monkeypatch.setenv("BREAKWATER_VLLM_CHAT_TEMPLATE", "/etc/tools.jinja")
    vllm = build_engine(options_from_settings(WorkerSettings()))
    assert isinstance(vllm, VLLMEngine)
    # vLLM's own parser: the tools pass through to the engine's template and parser
    assert (vllm.tool_parser, vllm.chat_template_path, vllm.tool_format) == (
        "hermes",
        "/etc/tools.jinja",
        "openai",
    )


def test_the_openai_engine_without_a_url_and_an_unknown_engine_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"^the openai engine needs --upstream-url \(e\.g\. http"):
        options_from_settings(WorkerSettings(engine="openai"))
    with pytest.raises(ValueError, match="unknown engine 'tpu' "):
        options_from_settings(WorkerSettings(engine="tpu"))
    assert ENGINES == ("sim", "llamacpp", "openai", "vllm")


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SimOptions().capacity = 1  # type: ignore[misc]


def test_sim_server_reuses_the_sim_engine_defaults() -> None:
    options = SimServerSettings().sim_options()
    # Sized like the upstream it stands in for; everything else is the sim engine's own default.
    assert options == SimOptions(capacity=UpstreamOptions.capacity)


def test_the_upstream_key_comes_from_its_file_and_stays_out_of_reprs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BREAKWATER_ENGINE", "openai")
    monkeypatch.setenv("BREAKWATER_UPSTREAM_URL", URL)
    monkeypatch.setenv("BREAKWATER_UPSTREAM_API_KEY", "sk-from-the-variable")
    from_variable = options_from_settings(WorkerSettings())
    assert isinstance(from_variable, UpstreamOptions) and from_variable.api_key == "sk-from-the-variable"
    secret = tmp_path / "upstream-key"
    secret.write_text("sk-from-the-secret\n")  # as `kubectl create secret --from-file` may leave it
    monkeypatch.setenv("BREAKWATER_UPSTREAM_API_KEY_FILE", str(secret))
    settings = WorkerSettings()
    options = options_from_settings(settings)
    assert isinstance(options, UpstreamOptions) and options.api_key == "sk-from-the-secret"  # the file wins
    engine = build_engine(options)
    assert isinstance(engine, OpenAIUpstreamEngine) and engine.api_key == "sk-from-the-secret"
    for text in (repr(settings), str(settings), repr(options)):
        assert "sk-from" not in text
