"""The ``vllm`` engine: vLLM's async engine inside the worker process (``pip install breakwater[vllm]``).

vLLM does the continuous batching, paged attention and prefix caching; the worker submits each job
with its sampling parameters and seed, streams DELTA outputs, aborts by leaving the stream, and
pulls only while vLLM has a free sequence slot and nothing waiting (read from its scheduler stats),
so the backlog stays in Redis. Prompts are tokenized here (the chat template of the model's
tokenizer), which makes usage exact and lets a reclaimed job continue from prompt + emitted text.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import uuid
from typing import Any

import orjson

from breakwater.engines.base import (
    EMBEDDINGS,
    GRAMMAR,
    LOGIT_BIAS,
    LOGPROBS,
    PENALTIES,
    RESPONSE_FORMAT,
    EngineInfo,
    EngineRequestError,
    GenerationRequest,
    SequenceDelta,
    check_fits,
)
from breakwater.engines.models import BUNDLED
from breakwater.engines.options import VLLMOptions
from breakwater.engines.streams import Flight, StreamingEngine
from breakwater.engines.vllm_tools import ToolParsing, check_parser, parser_class, template_messages
from breakwater.protocol.embeddings import normalised, pack
from breakwater.protocol.toolformats import PASS_THROUGH

log = logging.getLogger(__name__)


def cpu_defaults() -> None:
    """Offline, quiet, and on small CPU machines compute on every core (vLLM reserves one by default)."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, (os.cpu_count() or 1) - 1)}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }.items():
        os.environ.setdefault(key, value)


class _Load:
    """The scheduler's last stats (running, waiting, KV-cache usage), fed by a vLLM stat logger."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self

        class Recorder(StatLoggerBase):  # type: ignore[misc]
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    load.running = int(scheduler_stats.num_running_reqs)
                    load.waiting = int(scheduler_stats.num_waiting_reqs)
                    load.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self) -> None:
                pass

        return Recorder


class VLLMEngine(StreamingEngine):
    # vLLM's structured-output backend (xgrammar, ...: JSON Schema, and GBNF grammars) and its
    # logprobs (raw, before sampling)
    features = frozenset({RESPONSE_FORMAT, LOGPROBS, GRAMMAR, PENALTIES, LOGIT_BIAS})

    def __init__(self, options: VLLMOptions) -> None:
        super().__init__(options.window_share)
        self.model_path = options.model_path
        self.capacity = options.capacity
        self.kv_high = options.kv_high
        self.engine_args = dict(options.engine_args)
        # vLLM's pooling runner (`{"runner": "pooling"}` in vllm_args): this worker embeds, nothing else.
        self.pooling = self.engine_args.get("runner") == "pooling"
        if self.pooling:
            self.features = frozenset({EMBEDDINGS})
        self.info = EngineInfo(options.model, "vllm", options.context_length, options.capacity)
        # SmolLM2's instruct models were trained on its tool-call format (the setting overrides); with
        # vLLM's own tool parser the tools pass through to the chat template and the parser (vllm_tools).
        self.tool_parser = options.tool_parser
        self.chat_template_path = options.chat_template
        self.tool_format = "smollm2" if "smollm2" in options.model.lower() and not self.pooling else ""
        if self.tool_parser and not self.pooling:
            self.tool_format = PASS_THROUGH
        self.load = _Load()
        self._llm: Any = None
        self._tokenizer: Any = None
        self._sampling: Any = None
        self._parser_cls: Any = None
        self._chat_template: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # Importing vLLM and loading the model block for seconds to minutes: off the event loop,
        # so the worker's /healthz keeps answering (liveness) while /readyz says "loading".
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        cpu_defaults()
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self._sampling = SamplingParams
        path = self._resolve_model()
        args: dict[str, Any] = {
            "model": path,
            "served_model_name": [self.info.model],
            "max_model_len": self.info.context_length,
            "max_num_seqs": self.capacity,
            "disable_log_stats": False,  # the scheduler stats drive pulling
        }
        if current_platform.is_cpu():
            args["enforce_eager"] = True  # compiling takes minutes on CPU and its cache did not persist
        args.update(self.engine_args)  # GPU flags pass through: tensor_parallel_size, quantization, ...
        # A wrong parser name or template path fails here, before minutes of model loading.
        if self.tool_parser and not self.pooling:
            check_parser(self.tool_parser)
        if self.chat_template_path:
            with open(self.chat_template_path, encoding="utf-8") as f:
                self._chat_template = f.read()
        log.info("starting vLLM", extra={"fields": {"args": {k: str(v) for k, v in args.items()}}})
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[self.load.factory()])
        self._tokenizer = self._llm.get_tokenizer()
        if self.tool_parser and not self.pooling:
            self._parser_cls = parser_class(self.tool_parser, self._tokenizer, self.info.model)
        config = self._llm.vllm_config
        self.capacity = int(config.scheduler_config.max_num_seqs)
        self.info = EngineInfo(
            model=self.info.model,
            engine="vllm",
            context_length=int(config.model_config.max_model_len),
            capacity=self.capacity,
            vocab_size=int(config.model_config.get_vocab_size()),
        )

    def _resolve_model(self) -> str:
        if self.model_path:
            return self.model_path
        if self.info.model in BUNDLED:
            from breakwater.engines.prepare import prepare_hf

            return str(prepare_hf(self.info.model))
        return self.info.model  # a folder, or a model id vLLM resolves itself (hub cache)

    async def close(self) -> None:
        await super().close()
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()  # run AsyncLLM.__del__ now, not at interpreter exit when its helpers are gone

    # -- the engine interface --------------------------------------------------------------------
    def fingerprint(self) -> str:
        parts = [self.model_path or self.info.model, self.chat_template_path or "", self.tool_parser or ""]
        return "vllm:" + ":".join(parts)

    def free_slots(self) -> int:
        if self.load.waiting > 0 or self.load.kv_cache_usage >= self.kv_high:
            return 0  # vLLM is out of KV blocks: more jobs would only wait inside it
        return max(0, self.capacity - self.running())

    def stats(self) -> dict[str, Any]:
        return {
            "kv_cache_usage": self.load.kv_cache_usage,
            "engine_running": self.load.running,
            "engine_waiting": self.load.waiting,
        }

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: the tokenizer's chat template for messages (BOS from the template)."""
        tok = self._tokenizer
        if request.messages is None:
            return list(tok.encode(request.prompt or "", add_special_tokens=True))
        if not (self._chat_template or getattr(tok, "chat_template", None)):
            raise EngineRequestError(
                f"model {self.info.model} has no chat template; use /v1/completions with a prompt",
                code="chat_template_missing",
            )
        messages: list[dict[str, Any]] = list(request.messages)
        tools = None
        if request.tools is not None:  # passed through (vLLM's tool parser): the template shows them
            messages, tools = template_messages(request.messages), request.tools.get("tools")
        text = tok.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self._chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return list(tok.encode(text, add_special_tokens=False))

    def new_flight(self, request: GenerationRequest) -> Flight:
        if request.embed_inputs is not None:
            return super().new_flight(request)  # each input is tokenized and checked when embedded
        if self.pooling:
            raise EngineRequestError(
                f"this worker runs vLLM's pooling runner for {self.info.model}: it only embeds",
                code="unsupported_model",
            )
        prompt = self.tokenize(request)
        ctx = self.info.context_length
        check_fits(len(prompt), request, ctx)
        flight = super().new_flight(request)
        flight.prompt_ids = prompt
        return flight

    async def _generate(self, flight: Flight) -> None:
        if flight.request.embed_inputs is not None:
            await self._embed(flight)
            return
        req = flight.request
        rid = req.request_id
        prompt = flight.prompt_ids
        continued = self._tokenizer.encode(flight.text, add_special_tokens=False) if flight.text else []
        ids = prompt + list(continued)
        room = self.info.context_length - len(ids)
        wanted = room if req.max_tokens is None else req.max_tokens - flight.tokens
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        parsing = self._tool_parsing(req)
        if parsing is not None:  # `required`: vLLM's JSON schema of the tools
            structured = parsing.structured_outputs
        elif req.output_format is not None:  # never a continuation: the worker refuses those (jobs.refusal)
            fmt = req.output_format
            if fmt.needs_grammar:  # literal tags around the JSON (a tool-call format): GBNF
                structured = StructuredOutputsParams(grammar=fmt.grammar())
            elif fmt.kind == "json_schema":
                structured = StructuredOutputsParams(json=orjson.loads(fmt.schema))
            else:
                structured = StructuredOutputsParams(json_object=True)
        params = self._sampling(
            structured_outputs=structured,
            n=1,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            max_tokens=max(1, min(wanted, room)),
            stop=req.stop or None,
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=parsing.skip_special_tokens if parsing is not None else True,
        )
        finish: str | None = None
        async for out in self._llm.generate(
            {"prompt_token_ids": ids}, params, request_id=f"{rid}-{uuid.uuid4().hex[:8]}"
        ):
            choice = out.outputs[0]
            n = len(choice.token_ids)
            flight.tokens += n
            flight.add_text(choice.text)
            finish = choice.finish_reason or finish
            text = choice.text
            if parsing is not None:
                text = parsing.feed(text, choice.token_ids, prompt, choice.finish_reason is not None)
            if text or n:
                lps = (
                    None
                    if req.logprobs is None
                    else _logprobs(choice.token_ids, choice.logprobs, req.logprobs)
                )
                self._emit(SequenceDelta(rid, text=text, tokens=n, logprobs=lps))
        if finish is None:
            raise RuntimeError("vLLM ended the request without a finish reason")
        usage = {"prompt_tokens": len(prompt), "completion_tokens": flight.tokens}
        self._emit(SequenceDelta(rid, finish_reason=finish, usage=usage))

    def _tool_parsing(self, req: GenerationRequest) -> ToolParsing | None:
        """vLLM's parser for a request whose tools were passed through (None: no tools, or no parser:
        the gateway parses the model's format itself)."""
        if req.tools is None or self._parser_cls is None or req.messages is None:
            return None
        return ToolParsing(self._parser_cls, self._tokenizer, self.info.model, req.messages, req.tools)

    async def _embed(self, flight: Flight) -> None:
        """Every input through vLLM's pooling runner (one request each, batched by vLLM); the
        vectors L2-normalised and packed into the one final event (protocol.embeddings)."""
        from vllm import PoolingParams

        req = flight.request
        texts = req.embed_inputs or []
        ids = [list(self._tokenizer.encode(t, add_special_tokens=True)) for t in texts]
        longest = max((len(i) for i in ids), default=0)
        if longest > self.info.context_length:
            ctx = self.info.context_length
            message = f"This model's maximum context length is {ctx} tokens; an input has {longest}."
            self._emit(SequenceDelta(req.request_id, error=message, error_code="context_length_exceeded"))
            return

        async def one(i: int, tokens: list[int]) -> list[float]:
            final: Any = None
            async for out in self._llm.encode(
                {"prompt_token_ids": tokens}, PoolingParams(task="embed"), request_id=f"{req.request_id}-e{i}"
            ):
                final = out
            if final is None:
                raise RuntimeError("vLLM ended an embedding without output")
            return normalised([float(x) for x in final.outputs.data.tolist()])

        vectors = await asyncio.gather(*(one(i, tokens) for i, tokens in enumerate(ids)))
        usage = {"prompt_tokens": sum(len(i) for i in ids), "completion_tokens": 0}
        self._emit(SequenceDelta(req.request_id, text=pack(list(vectors)), finish_reason="stop", usage=usage))


def _logprobs(token_ids: Any, logprobs: Any, top: int) -> list[dict[str, Any]]:
    """vLLM's per-token ``{token id: Logprob}`` maps (the sampled token, and the ``top`` best by
    rank) in OpenAI's chat shape."""

    def one(entry: Any) -> dict[str, Any]:
        text = entry.decoded_token or ""
        return {"token": text, "logprob": float(entry.logprob), "bytes": list(text.encode())}

    out = []
    for token_id, ranked in zip(token_ids, logprobs or [], strict=False):
        best = sorted(
            (e for e in ranked.values() if e.rank is not None and e.rank <= top), key=lambda e: e.rank
        )
        out.append({**one(ranked[token_id]), "top_logprobs": [one(e) for e in best[:top]]})
    return out
