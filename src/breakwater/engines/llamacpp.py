"""The ``llamacpp`` engine: GGUF models through llama.cpp's low-level API with continuous batching.

One llama context holds up to ``capacity`` sequences (one seq_id each). Every step builds one batch:
one token for each decoding sequence, then prompt chunks of joining sequences up to the batch budget
(so a long prompt never freezes running streams), decodes it once and samples each sequence with its
own sampler chain (temperature, top_k, top_p, seed). Sequences join and leave between steps.

Structured output: a grammar sampler (llama.cpp's GBNF, from the JSON Schema) heads the chain, so
only tokens the grammar admits can be sampled. A continued sequence feeds its emitted tokens to the
grammar first, so the constraint holds across a worker crash.

Embeddings: a second, small context of the same model (created on first use) with mean pooling;
each input is decoded alone there and its pooled vector L2-normalised.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from breakwater.engines.base import (
    CONSTRAINED_CONTINUATION,
    EMBEDDINGS,
    GRAMMAR,
    LOGIT_BIAS,
    LOGPROBS,
    PENALTIES,
    RESPONSE_FORMAT,
    Engine,
    EngineInfo,
    EngineRequestError,
    GenerationRequest,
    SequenceDelta,
    StopChecker,
    check_fits,
)
from breakwater.engines.llamacpp_sampling import Vocab, reseed, sampler_chain
from breakwater.engines.options import LlamaCppOptions
from breakwater.protocol.embeddings import normalised, pack

GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR = 3, 4


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _QUIET_LOG(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every load step to stderr; keep only warnings and errors."""
    if level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR):
        os.write(2, text)


@dataclass(slots=True)
class _Seq:
    request: GenerationRequest
    slot: int
    tokens: list[int]  # prompt (+ continued text) still to prefill, then nothing
    prompt_tokens: int
    limit: int  # completion tokens allowed in total (incl. continued ones)
    sampler: Any
    stop: StopChecker
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    n_past: int = 0
    prefill_pos: int = 0
    last_token: int | None = None
    completion: int = 0
    cancelled: bool = False


class LlamaCppEngine(Engine):
    """Continuous batching over one llama.cpp context."""

    features = frozenset(
        {RESPONSE_FORMAT, CONSTRAINED_CONTINUATION, EMBEDDINGS, LOGPROBS, GRAMMAR, PENALTIES, LOGIT_BIAS}
    )
    overlaps_publish = True

    def __init__(self, options: LlamaCppOptions) -> None:
        self.model_path = options.gguf()
        # SmolLM2's instruct models were trained on its tool-call format (the setting overrides).
        self.tool_format = "smollm2" if "smollm2" in Path(self.model_path).name.lower() else ""
        self.capacity = options.capacity
        self.requested_ctx = options.context_length
        self.n_threads = options.n_threads or max(1, os.cpu_count() or 1)
        self.n_batch = options.n_batch
        self.info = EngineInfo(
            model=options.model_name,
            engine="llamacpp",
            context_length=options.context_length,
            capacity=options.capacity,
        )
        self._seqs: dict[str, _Seq] = {}
        self._free_slots = list(range(self.capacity))
        self._to_clear: list[int] = []
        self._to_free: list[Any] = []  # samplers of sequences released while a decode may sample with them
        self._work = asyncio.Event()
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._n_vocab = 0
        self._eog: list[int] = []
        self._batch: Any = None
        self._last_step: tuple[int, int] | None = None  # (sequences, prompt tokens) of the last batch
        self._formatter: Jinja2ChatFormatter | None = None
        self._embeds: list[tuple[GenerationRequest, list[list[int]]]] = []  # waiting for the next step
        self._embed_ctx: Any = None
        self._embed_batch: Any = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        llama_cpp.llama_log_set(_QUIET_LOG, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        # End-of-generation tokens (EOS, EOT, ...): ignore_eos masks them all.
        self._eog = [t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        train_ctx = int(llama_cpp.llama_model_n_ctx_train(self._model))
        per_seq = min(self.requested_ctx, train_ctx) if train_ctx > 0 else self.requested_ctx
        width = int(llama_cpp.llama_model_n_embd(self._model))
        self.info = EngineInfo(self.info.model, "llamacpp", per_seq, self.capacity, width, self._n_vocab)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = per_seq * self.capacity
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.capacity
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        template = self._meta("tokenizer.chat_template")
        if template:
            self._formatter = Jinja2ChatFormatter(
                template,
                eos_token=self._piece(llama_cpp.llama_vocab_eos(self._vocab), special=True),
                bos_token=self._piece(llama_cpp.llama_vocab_bos(self._vocab), special=True),
            )

    async def close(self) -> None:
        if self._embed_batch is not None:
            llama_cpp.llama_batch_free(self._embed_batch)
            self._embed_batch = None
        if self._embed_ctx:
            llama_cpp.llama_free(self._embed_ctx)
            self._embed_ctx = None
        for seq in self._seqs.values():
            llama_cpp.llama_sampler_free(seq.sampler)
        self._seqs.clear()
        self._free_samplers()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # -- tokenizer -------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        data = text.encode()
        n_max = len(data) + 16
        arr = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), arr, n_max, special, special)
        if n < 0:
            arr = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), arr, -n, special, special)
        return list(arr[:n])

    def _piece_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _piece(self, token: int, special: bool = False) -> str:
        return self._piece_bytes(token, special).decode("utf-8", "replace")

    def render(self, request: GenerationRequest) -> str:
        """The prompt text: the model's own chat template for messages."""
        if request.messages is None:
            return request.prompt or ""
        if self._formatter is None:
            raise EngineRequestError(
                f"model {self.info.model} has no chat template; use /v1/completions with a prompt",
                code="chat_template_missing",
            )
        return str(self._formatter(messages=cast(Any, request.messages)).prompt)

    # -- batching --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        path = Path(self.model_path)
        stat = path.stat()
        return f"llamacpp:{path.name}:{stat.st_size}:{stat.st_mtime_ns}"

    def free_slots(self) -> int:
        return len(self._free_slots)

    def running(self) -> int:
        return len(self._seqs)

    def add(self, request: GenerationRequest) -> None:
        if request.embed_inputs is not None:
            texts = [self.tokenize(text, special=True) for text in request.embed_inputs]
            longest, ctx = max(len(t) for t in texts), self.info.context_length
            if longest > ctx:
                raise EngineRequestError(
                    f"an input has {longest} tokens; this model's context length is {ctx}",
                    code="context_length_exceeded",
                )
            self._embeds.append((request, texts))
            self._work.set()
            return
        if not self._free_slots:
            raise EngineRequestError("engine is full", code="engine_full")
        prompt = self.tokenize(self.render(request), special=True)
        ctx = self.info.context_length
        continued = self.tokenize(request.emitted_text, special=False) if request.emitted_text else []
        check_fits(len(prompt) + len(continued), request, ctx)
        room = ctx - len(prompt)
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        sampler = self._sampler(request, continued)  # may refuse: before a slot is taken
        slot = self._free_slots.pop()
        self._seqs[request.request_id] = _Seq(
            request=request,
            slot=slot,
            tokens=prompt + continued,
            prompt_tokens=len(prompt),
            limit=limit,
            sampler=sampler,
            stop=StopChecker(request.stop),
            completion=request.emitted_tokens,
        )
        self._work.set()

    def _sampler(self, request: GenerationRequest, continued: list[int]) -> Any:
        vocab = Vocab(self._vocab, self._n_vocab, self._eog)
        return sampler_chain(request, continued, vocab, self.info.context_length)

    def cancel(self, request_id: str) -> None:
        self._embeds = [e for e in self._embeds if e[0].request_id != request_id]
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._release(seq)

    def _release(self, seq: _Seq) -> None:
        # The KV cells are cleared and the sampler freed at the start of the next step, never while a
        # decode runs: a sequence cancelled mid-step (its client left) may be sampled in that step's
        # thread right now, and freeing its sampler then is a use-after-free (a crashed worker).
        self._to_clear.append(seq.slot)
        self._free_slots.append(seq.slot)
        self._to_free.append(seq.sampler)
        seq.cancelled = True

    def _free_samplers(self) -> None:
        for sampler in self._to_free:
            llama_cpp.llama_sampler_free(sampler)
        self._to_free.clear()

    def last_step(self) -> tuple[int, int] | None:
        return self._last_step

    async def step(self) -> list[SequenceDelta]:
        while not self._seqs and not self._embeds:
            self._work.clear()
            await self._work.wait()
        embedded: list[SequenceDelta] = []
        self._last_step = None
        if self._embeds:
            jobs, self._embeds = self._embeds, []
            embedded = await asyncio.to_thread(self._embed_all, jobs)
            if not self._seqs:
                return embedded
        mem = llama_cpp.llama_get_memory(self._ctx)
        for slot in self._to_clear:
            llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
        self._to_clear.clear()
        self._free_samplers()
        plan = self._plan()
        if not embedded:  # a step that also embedded took longer than its batch: not one to fit
            prefill = sum(len(tokens) for seq, tokens, _ in plan if seq.last_token is None)
            self._last_step = (len(plan), prefill)
        sampled = await asyncio.to_thread(self._decode_and_sample, plan)
        return embedded + [self._emit(seq, token, lp) for seq, token, lp in sampled if not seq.cancelled]

    def _embed_all(self, jobs: list[tuple[GenerationRequest, list[list[int]]]]) -> list[SequenceDelta]:
        """Every input of every job through the embedding context, one input per decode."""
        if self._embed_ctx is None:
            n_ctx = self.info.context_length
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = self.n_threads
            cparams.embeddings = True
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            self._embed_ctx = llama_cpp.llama_init_from_model(self._model, cparams)
            if not self._embed_ctx:
                raise RuntimeError("llama.cpp could not create an embedding context")
            self._embed_batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        ctx, batch = self._embed_ctx, self._embed_batch
        n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        out = []
        for request, texts in jobs:
            vectors = []
            for tokens in texts:
                for i, token in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True
                batch.n_tokens = len(tokens)
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed on an embedding input")
                pooled = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                vectors.append(normalised([float(pooled[i]) for i in range(n_embd)]))
            usage = {"prompt_tokens": sum(len(t) for t in texts), "completion_tokens": 0}
            out.append(
                SequenceDelta(request.request_id, text=pack(vectors), finish_reason="stop", usage=usage)
            )
        return out

    def _plan(self) -> list[tuple[_Seq, list[int], bool]]:
        """(sequence, tokens to feed, whether to sample after) for one batch within ``n_batch``."""
        plan: list[tuple[_Seq, list[int], bool]] = []
        budget = self.n_batch
        for seq in self._seqs.values():  # decoding sequences first: one token each
            if seq.last_token is not None and budget > 0:
                plan.append((seq, [seq.last_token], True))
                budget -= 1
        for seq in self._seqs.values():  # then prompt chunks
            if seq.last_token is None and budget > 0:
                chunk = seq.tokens[seq.prefill_pos : seq.prefill_pos + budget]
                done = seq.prefill_pos + len(chunk) >= len(seq.tokens)
                plan.append((seq, chunk, done))
                budget -= len(chunk)
        return plan

    def _decode_and_sample(
        self, plan: list[tuple[_Seq, list[int], bool]]
    ) -> list[tuple[_Seq, int, dict[str, Any] | None]]:
        batch = self._batch
        n = 0
        sample_at: list[tuple[_Seq, int]] = []
        for seq, tokens, sample in plan:
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = seq.n_past + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                last = sample and j == len(tokens) - 1
                batch.logits[n] = last
                if last:
                    sample_at.append((seq, n))
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")
        for seq, tokens, _ in plan:
            seq.n_past += len(tokens)
            if seq.last_token is None:
                seq.prefill_pos += len(tokens)
        out: list[tuple[_Seq, int, dict[str, Any] | None]] = []
        for seq, i in sample_at:
            top = seq.request.logprobs
            logprobs = self._log_softmax(i) if top is not None else None  # the model's own, before sampling
            reseed(seq.sampler, seq.request, seq.completion)
            token = int(llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, i))
            out.append(
                (seq, token, None if logprobs is None else self._logprob_entry(logprobs, token, top or 0))
            )
        return out

    def _log_softmax(self, i: int) -> Any:
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, i), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        peak = logits.max()
        return logits - (peak + np.log(np.exp(logits - peak).sum()))

    def _logprob_entry(self, logprobs: Any, token: int, top: int) -> dict[str, Any]:
        """OpenAI's per-token shape: the chosen token and the ``top`` most likely ones."""

        def one(t: int) -> dict[str, Any]:
            raw = self._piece_bytes(t)
            return {
                "token": raw.decode("utf-8", "replace"),
                "logprob": float(logprobs[t]),
                "bytes": list(raw),
            }

        best: list[int] = [int(t) for t in np.argpartition(-logprobs, top)[:top]] if top else []
        ranked = sorted(best, key=lambda t: -float(logprobs[t]))
        return {**one(token), "top_logprobs": [one(t) for t in ranked]}

    def _emit(self, seq: _Seq, token: int, logprob: dict[str, Any] | None = None) -> SequenceDelta:
        seq.last_token = token
        rid = seq.request.request_id
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):  # it writes nothing: no entry
            text, entries = self._rest(seq)
            return self._finish(seq, text, 0, "stop", entries or None)
        seq.completion += 1
        # The stop checker holds a token's entry as long as its text, and drops a stop string's.
        text, stopped, entries = seq.stop.feed_token(seq.decoder.decode(self._piece_bytes(token)), logprob)
        if stopped:
            return self._finish(seq, text, 1, "stop", entries or None)
        if seq.completion >= seq.limit or seq.n_past + 1 >= self.info.context_length:
            rest, more = self._rest(seq)
            return self._finish(seq, text + rest, 1, "length", entries + more or None)
        return SequenceDelta(request_id=rid, text=text, tokens=1, logprobs=entries or None)

    @staticmethod
    def _rest(seq: _Seq) -> tuple[str, list[dict[str, Any]]]:
        """At the answer's end: the text (and entries) the decoder and the stop checker still hold."""
        tail, _, entries = seq.stop.feed_token(seq.decoder.decode(b"", final=True))
        rest, more = seq.stop.flush_items()
        return tail + rest, entries + more

    def _finish(
        self, seq: _Seq, text: str, tokens: int, reason: str, logprobs: list[dict[str, Any]] | None = None
    ) -> SequenceDelta:
        self._seqs.pop(seq.request.request_id, None)
        self._release(seq)
        usage = {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.completion}
        return SequenceDelta(
            seq.request.request_id,
            text=text,
            tokens=tokens,
            finish_reason=reason,
            usage=usage,
            logprobs=logprobs,
        )

    def stats(self) -> dict[str, Any]:
        used = sum(s.n_past for s in self._seqs.values())
        total = self.info.context_length * self.capacity
        return {"running": len(self._seqs), "kv_cache_usage": used / total if total else 0.0}
