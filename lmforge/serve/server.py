"""The server's state: one model served by one engine loop, and how a request becomes engine inputs.

`Server` holds the engine loop, tokenizer, chat template, structured-output compiler, --controls, metrics,
admission and the LoRA adapters served beside the model (a request names one as its `model`). Routes (routes.py)
reach it through `request.app.state.server`; they turn a request into prompts and `SamplingParams` with the
methods here, take a `Slot` (admission), submit, and hand the engine's streams to streaming.py. A `Slot` is
released whichever way the request ends, which aborts its engine requests (freeing their KV blocks) and gives its
place back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.engine.engine import Engine
from lmforge.engine.loop import EngineLoop, EngineStopped, RequestStream
from lmforge.engine.remote import EngineProcess
from lmforge.errors import LmforgeError
from lmforge.infer.controls import Controls, ControlSpec
from lmforge.infer.generate import prompt_tokens
from lmforge.infer.multi_lora import AdapterBank
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.peft import read_adapter
from lmforge.serve.edge import Metrics, RateLimiter
from lmforge.serve.errors import ApiError
from lmforge.serve.settings import ServeSettings
from lmforge.serve.structured import (
    JSON_OBJECT_SCHEMA,
    ConstraintCompiler,
    StructuredOutputError,
    TokenConstraint,
    check_regex,
    regex_for_choice,
    regex_for_json_schema,
    token_bytes,
)
from lmforge.serve.tools import ToolRequest, template_messages
from lmforge.templates import ChatTemplate


def engine_unavailable(error: BaseException) -> ApiError:
    """503 for a request the engine cannot serve because the engine loop has stopped."""
    return ApiError(
        503,
        f"the engine has stopped ({error}); the server cannot generate until it is restarted",
        type="server_error",
        code="engine_unavailable",
    )


class Slot:
    """One admitted request's place: its `sequences` (prompts x n) count against the server's bound, and its
    `reservation` against the API key's tokens per minute. `release` (idempotent) ends it whichever way the
    request ends: it aborts the engine requests still running (a no-op for finished ones; a disconnected
    client's are freed at once), frees the place and charges the key what was used (`tokens`) instead of what
    was reserved."""

    def __init__(self, server: Server, sequences: int, reservation: list | None):
        self.server, self.sequences, self.reservation, self.tokens, self.released = (
            server,
            sequences,
            reservation,
            0,
            False,
        )
        self.request_ids: list[str] = []

    def release(self) -> None:
        if not self.released:
            self.released = True
            for rid in self.request_ids:
                self.server.loop.abort(rid)
            self.server.active -= 1
            self.server.sequences -= self.sequences
            self.server.rate.settle(self.reservation, self.tokens)


def build_engine(model, tokenizer, settings: ServeSettings, draft=None) -> Engine:
    """The engine `settings` describe over `model`, serving --lora's adapters beside it (in the server's process,
    or in the engine's own: lmforge.serve.app.engine_from_settings)."""
    adapters = AdapterBank(model)  # --lora's, and those loaded at run time
    for name, path in settings.lora.items():
        adapters.add(name, read_adapter(path, model.config))
    return Engine(
        model,
        tokenizer,
        max_num_seqs=settings.max_batch,
        max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_batch),
        draft=draft,
        speculative=settings.speculative,
        num_speculative_tokens=settings.num_speculative_tokens,
        kv_dtype=None if settings.kv_dtype == "auto" else getattr(torch, settings.kv_dtype),
        adapters=adapters,
    )


def add_adapter(engine: Engine, name: str, adapter) -> None:
    """(On the engine's thread, wherever it runs) serve one more LoRA adapter."""
    assert engine.adapters is not None  # every served engine has a bank (build_engine)
    engine.adapters.add(name, adapter)


class Server:
    """One model served: engine loop, tokenizer, chat template, structured-output compiler, admission.

    The engine runs on a thread of this process over `model`, or, given `engine_process` (a picklable callable
    that builds the engine: lmforge.serve.app.engine_from_settings), in its own process (lmforge.engine.remote),
    when `model` only lends its config.
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: ServeSettings,
        model_folder: str | Path | ChatTemplate | None = None,
        draft=None,
        engine_process: Callable[[], Engine] | None = None,
    ):
        if tokenizer is None:
            raise LmforgeError(
                "serving needs a tokenizer: the model folder has none; pass --tokenizer PATH", "tokenizer"
            )
        self.settings, self.tokenizer, self.config = settings, tokenizer, model.config
        ctx = model.config.block_size
        self.max_model_len = min(ctx, settings.max_model_len or ctx)
        self.max_num_batched_tokens = max(settings.max_num_batched_tokens, settings.max_batch)
        self.engine_process = engine_process
        self.engine = build_engine(model, tokenizer, settings, draft) if engine_process is None else None
        self.adapter_paths = dict(settings.lora)  # the adapters served, by name
        self.vocab_size = model.config.vocab_size
        self.template = (
            ChatTemplate(Path(settings.chat_template).read_text(encoding="utf-8"), tokenizer)
            if settings.chat_template
            else model_folder
            if isinstance(model_folder, ChatTemplate)
            else ChatTemplate.for_model(model_folder, tokenizer)
        )
        self.compiler = ConstraintCompiler(tokenizer, self.vocab_size)
        self.controls = Controls.from_file(settings.controls, tokenizer, self.vocab_size) if settings.controls else None
        self.api_keys = settings.api_keys()
        self.metrics = Metrics()
        self.rate = RateLimiter(settings.rate_limit_tpm)
        self.loop: EngineLoop | EngineProcess | None = None  # started by the app's lifespan (start_engine)
        self._token_bytes: dict[int, bytes] | None = None
        self.active = 0  # HTTP generation requests in flight
        self.sequences = 0  # their engine sequences (prompts x n each), bounded by max_batch + max_queue
        self.created = int(time.time())

    def start_engine(self, on_exit: Callable[[], None] | None = None) -> EngineLoop | EngineProcess:
        """The engine loop: on a thread over the model, or in its own process (`on_exit`: called if it dies)."""
        if self.engine_process is None:
            assert self.engine is not None
            return EngineLoop(self.engine)
        return EngineProcess(self.engine_process, self.tokenizer, on_exit=on_exit)

    def close_engine(self) -> None:
        if self.loop is not None:
            self.loop.close()
        if self.engine is not None and self.engine.adapters is not None:
            self.engine.adapters.close()  # the model's LoRA hooks go with the server

    # -- admission: by work, the engine sequences a request adds (its prompts x n)
    @property
    def max_sequences(self) -> int:
        return self.settings.max_batch + self.settings.max_queue

    def check_size(self, num_prompts: int, n: int) -> None:
        """400 for a request that could never be admitted (more sequences than the whole bound); checked before
        its prompts are tokenized, so a long list of prompts costs nothing."""
        if num_prompts * n > self.max_sequences:
            raise ApiError(
                400,
                f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} "
                f"sequences; the server holds at most {self.max_sequences} (max_batch "
                f"{self.settings.max_batch} + max_queue {self.settings.max_queue}): send fewer "
                f"prompts or a smaller n",
                "n" if num_prompts <= self.max_sequences else "prompt",
                code="request_too_large",
            )

    def admit(self, key: str, prompts: list[list[int]], params: SamplingParams) -> Slot:
        """Take a place for a request of len(prompts) x n sequences (429 when the server cannot hold them now),
        reserving its most tokens from the key's rate (the prompts, and max_tokens for each sequence); release it
        when the request ends."""
        num_prompts, n = len(prompts), params.n
        self.check_size(num_prompts, n)
        wanted = num_prompts * n
        if self.sequences + wanted > self.max_sequences:
            raise ApiError(
                429,
                f"the server is full: {self.sequences} sequences in flight and this request adds "
                f"{wanted} (at most {self.max_sequences}: max_batch {self.settings.max_batch} + "
                f"max_queue {self.settings.max_queue}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        reservation = self.rate.reserve(key, sum(map(len, prompts)) + wanted * params.max_tokens)
        self.active += 1
        self.sequences += wanted
        return Slot(self, wanted, reservation)

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the served model itself); 404 for any other name."""
        if name is None or name == self.settings.model_name:
            return None
        if name in self.adapter_paths:
            return name
        served = ", ".join(repr(n) for n in [self.settings.model_name, *self.adapter_paths])
        raise ApiError(
            404, f"the model {name!r} does not exist; this server serves {served}", "model", code="model_not_found"
        )

    def model_card(self, name: str | None = None) -> dict:
        """/v1/models' entry for the model, or for one of its adapters (whose `parent` is the model)."""
        card = {
            "id": name or self.settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "lmforge",
            "max_model_len": self.max_model_len,
        }
        return card | ({"parent": self.settings.model_name, "root": self.adapter_paths.get(name)} if name else {})

    def model_cards(self) -> list[dict]:
        return [self.model_card()] + [self.model_card(name) for name in self.adapter_paths]

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve the adapter folder at `path` as `name` (read in a worker thread, added between engine steps)."""
        if name == self.settings.model_name or name in self.adapter_paths:
            raise ApiError(400, f"the name {name!r} is taken; unload it first or choose another", "lora_name")
        adapter = await asyncio.to_thread(read_adapter, path, self.config)
        await asyncio.wrap_future(self._engine().call(add_adapter, name, adapter))
        self.adapter_paths[name] = path

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter (between engine steps); 400 while requests use it."""
        await asyncio.wrap_future(self._engine().call(Engine.remove_adapter, name))
        self.adapter_paths.pop(name, None)

    def _engine(self) -> EngineLoop | EngineProcess:
        assert self.loop is not None, "the engine starts with the app's lifespan"
        return self.loop

    # -- requests -> engine inputs
    async def encode(self, text: str, param: str) -> list[int]:
        """`text`'s tokens, computed in a worker thread with `encode_batch` (which lets go of the GIL, where HF
        tokenizers' `encode` holds it: a 1 MB prompt would stall every other request for a second); a text the
        tokenizer cannot encode is a 400 naming `param`."""
        try:
            [ids] = await asyncio.to_thread(self.tokenizer.encode_batch, [text])
        except LmforgeError as e:
            raise ApiError(400, str(e), param) from e
        return ids.tolist()

    async def prompts(self, prompt, n: int) -> list[list[int]]:
        """The completions `prompt` field (text, texts, token ids, lists of token ids) as token id lists; a list
        holding more prompts than the server could ever run x n is refused before any is tokenized."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        self.check_size(len(prompt), n)
        out = []
        for p in prompt:
            ids = (
                (await self.encode(p, "prompt") if p else prompt_tokens(self.tokenizer, ""))
                if isinstance(p, str)
                else list(p)
            )
            if not ids or min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ApiError(400, f"prompt token ids must be in 0..{self.vocab_size - 1}", "prompt")
            out.append(ids)
        return out

    async def render(self, messages, tools: ToolRequest | None = None) -> str:
        """Chat messages (protocol.ChatMessage) as the prompt text the chat template makes of them, with the
        request's tools (in a worker thread: a template runs over the whole conversation)."""
        dicts = template_messages([m.template_dict() for m in messages])
        return await asyncio.to_thread(self.template.render, dicts, tools.template_tools if tools else None)

    async def chat_prompt(self, messages, tools: ToolRequest | None = None) -> list[int]:
        return await self.encode(await self.render(messages, tools), "messages") or prompt_tokens(self.tokenizer, "")

    def max_tokens(
        self, requested: int | None, prompt_len: int, default: int | None, param: str, prompt_param: str
    ) -> int:
        """The request's output budget: what it asked for (or `default`, or all the room left), checked to fit."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_len} tokens but max_model_len is {self.max_model_len}; shorten it",
                prompt_param,
                code="context_length_exceeded",
            )
        wanted = requested if requested is not None else (default if default is not None else room)
        if wanted > room:
            raise ApiError(
                400,
                f"{param}={wanted} plus the prompt's {prompt_len} tokens exceeds max_model_len "
                f"{self.max_model_len}; lower {param} to at most {room}",
                param,
                code="context_length_exceeded",
            )
        return wanted

    def constraint_regex(self, req, tools: ToolRequest | None = None) -> tuple[str, str] | None:
        """(regex, param) of the request's structured-output format (tool_choice "required" or a named function
        is one), or None for free text."""
        fmt = getattr(req, "response_format", None)
        chosen = [p for p, v in (("regex", req.regex), ("choice", req.choice)) if v is not None]
        if fmt is not None and fmt.type != "text":
            chosen.append("response_format")
        if tools is not None and tools.constrained:
            chosen.append("tool_choice")
        if len(chosen) > 1:
            raise ApiError(400, f"give at most one output format; got {', '.join(chosen)}", chosen[1])
        if chosen and req.stop:  # the answer must run to the end of its format
            raise ApiError(
                400,
                f"stop strings cannot be combined with {chosen[0]}: a stop string would cut the "
                f"answer before its format is complete",
                "stop",
            )
        if chosen and getattr(req, "echo", False):
            raise ApiError(
                400,
                f"echo cannot be combined with {chosen[0]}: the prompt before the answer would not match the format",
                "echo",
            )
        if tools is not None and tools.constrained:
            return regex_for_json_schema(tools.schema(), "tools"), "tool_choice"
        if req.regex is not None:
            return check_regex(req.regex), "regex"
        if req.choice is not None:
            return regex_for_choice(req.choice), "choice"
        if fmt is not None and fmt.type == "json_object":
            return regex_for_json_schema(JSON_OBJECT_SCHEMA), "response_format"
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ApiError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
            return regex_for_json_schema(fmt.json_schema.schema_), "response_format"
        return None

    async def attach_constraint(
        self, req, params: SamplingParams, tools: ToolRequest | None = None
    ) -> TokenConstraint | None:
        """The request's output format as a token mask on its params (compiled in a worker thread), or None."""
        spec = self.constraint_regex(req, tools)
        if spec is not None:
            params.allowed_tokens = await asyncio.to_thread(self.compiler.constraint, *spec)
        return params.allowed_tokens

    def attach_controls(self, params: SamplingParams, phrases: list[str] | None = None):
        """Apply --controls and the request's own banned phrases (checked on the text, as --controls's are) to its
        params; the guard (None when there is neither) counts what fired. /metrics counts --controls entries
        only: a client's phrases would make its label values unbounded."""
        phrases = [p for p in phrases or [] if p]
        if not phrases:
            return self.controls.attach(params, self.metrics.control_fired) if self.controls is not None else None
        base = self.controls.spec if self.controls is not None else ControlSpec()
        spec = ControlSpec(
            base.banned_phrases + [p for p in phrases if p not in base.banned_phrases],
            dict(base.logit_bias),
            base.ignore_case,
        )
        operator = set(base.banned_phrases)

        def on_fire(kind: str, control: str) -> None:
            if kind == "logit_bias" or control in operator:
                self.metrics.control_fired(kind, control)

        return Controls(spec, self.tokenizer, self.vocab_size).attach(params, on_fire)

    # -- running
    def submit(
        self, prompts: list[list[int]], params: SamplingParams, slot: Slot, adapter: str | None = None
    ) -> list[RequestStream]:
        """Queue one engine request per prompt (all or none: a bad one aborts the others, 400 naming the cause),
        with the LoRA adapter `adapter` (None: the model itself)."""
        base = uuid.uuid4().hex
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                slot.request_ids.append(f"{base}-{i}")
                streams.append(self.loop.submit(prompt, params, slot.request_ids[-1], adapter))
        except LmforgeError as e:
            slot.release()
            raise ApiError.of(e) from e
        except EngineStopped as e:  # the engine's thread died: say so at once (/health says 503 too)
            slot.release()
            raise engine_unavailable(e) from e
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return streams

    # -- token spelling (logprobs)
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to the text (exact even for a piece of a multi-byte character)."""
        if self._token_bytes is None:
            try:
                self._token_bytes = token_bytes(self.tokenizer)
            except StructuredOutputError:  # word tokenizers: their decoded text is the best there is
                self._token_bytes = {}
        b = self._token_bytes.get(token)
        return b if b is not None else self.tokenizer.decode([token]).encode("utf-8")

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")
