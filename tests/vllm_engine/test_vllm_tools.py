"""vLLM's own tool parsers as the in-process engine drives them (engines/vllm_tools.py), without a
model: a scripted answer, cut into the real tokenizer's tokens, goes through :class:`ToolParsing` one
token a step (as vLLM's DELTA outputs come), and what the engine writes must parse, with the gateway's
parser, into the calls vLLM's parser finds in the whole answer. Runs in the vLLM environment."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.vllm_engine.test_vllm import VLLM_PYTHON, prepared_model_dir

SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer
from breakwater.engines.vllm_tools import ToolParsing, parser_class
from breakwater.protocol.toolformats import PASS_THROUGH, split_answer, tags_of

tok = AutoTokenizer.from_pretrained(sys.argv[1])
params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
names = ("get_weather", "get_time")
tools = [{"type": "function", "function": {"name": n, "parameters": params}} for n in names]
for parser, answer, parallel in json.loads(sys.argv[2]):
    cls = parser_class(parser, tok, "m")
    passed = {"tools": tools, "parallel_tool_calls": parallel}
    parsing = ToolParsing(cls, tok, "m", [{"role": "user", "content": "q"}], passed)
    ids = tok.encode(answer, add_special_tokens=False)
    written, before = [], ""
    for i in range(len(ids)):
        text = tok.decode(ids[: i + 1])
        written.append(parsing.feed(text[len(before):], ids[i : i + 1], [1, 2], i == len(ids) - 1))
        before = text
    content, calls = split_answer("".join(written), tags=tags_of(PASS_THROUGH))
    whole = cls(tok, parsing.request.tools).extract_tool_calls(answer, parsing.request)
    print(json.dumps({
        "content": content,
        "calls": [[c.name, json.loads(c.arguments)] for c in calls],
        "vllm_content": whole.content or "",
        "vllm_calls": [[c.function.name, json.loads(c.function.arguments)] for c in whole.tool_calls],
    }))
"""

HERMES_TWO = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>'
)
XLAM_TWO = (
    '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {"city": "Tokyo"}}]</tool_call>'
)
TWO_CALLS = [["get_weather", {"city": "Paris"}], ["get_time", {"city": "Tokyo"}]]


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return prepared_model_dir()


def test_vllm_parsers_streamed_token_by_token_give_the_whole_answers_calls(tokenizer_dir: str) -> None:
    cases = [
        ("hermes", HERMES_TWO, True),
        ("xlam", XLAM_TWO, True),
        ("hermes", "No tool is needed here.", True),
        ("hermes", HERMES_TWO, False),
        ("xlam", XLAM_TWO, False),
    ]
    out = subprocess.run(
        [VLLM_PYTHON, "-c", SCRIPT, tokenizer_dir, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    hermes, xlam, text, hermes_one, xlam_one = (
        json.loads(line) for line in out.stdout.strip().splitlines()[-5:]
    )
    # Hermes: text before the calls stays content; both calls, arguments as vLLM's parser reads them.
    assert hermes["calls"] == hermes["vllm_calls"] == TWO_CALLS
    assert hermes["content"] == hermes["vllm_content"] == "Let me look.\n"
    # xLAM (a JSON list of calls, SmolLM2's format): both calls. vLLM's streaming xLAM parser lets the
    # first characters of the tag through as content before it recognises it, as its server does.
    assert xlam["calls"] == xlam["vllm_calls"] == TWO_CALLS
    assert xlam["content"] in ("", "<tool_call")
    # No call: the answer is content, unchanged.
    want = "No tool is needed here."
    assert text == {"content": want, "calls": [], "vllm_content": want, "vllm_calls": []}
    # `parallel_tool_calls: false`: the first call only, as vLLM's server filters the stream.
    assert hermes_one["calls"] == xlam_one["calls"] == TWO_CALLS[:1]
    assert hermes_one["content"] == "Let me look.\n"
