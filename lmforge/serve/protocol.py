"""OpenAI API request models, field by field in the reference's order, and their conversion to SamplingParams.

References: https://platform.openai.com/docs/api-reference/completions/create and
https://platform.openai.com/docs/api-reference/chat/create. Fields lmforge adds sit in a marked section at the
end of each model. The server never hands these to the engine: `to_sampling_params` makes the engine's own
settings, so HTTP types stop here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.infer.sampling import (
    GREEDY_TEMPERATURE,
    MAX_LOGPROBS,
    MAX_TEMPERATURE,
    REPETITION_PENALTY_RANGE,
    SamplingParams,
)
from lmforge.serve.errors import ApiError

TEMPERATURE = Field(
    default=1.0,
    description=f"sampling temperature in [0, {MAX_TEMPERATURE:g}]; 0, or anything "
    f"below {GREEDY_TEMPERATURE:g} (too small to divide by), is greedy decoding",
)
TOP_K = Field(
    default=None,
    description="keep the k most likely tokens; 0 or none keeps all, as does any k at least the vocabulary's size",
)
REPETITION_PENALTY = Field(
    default=None,
    description="divide the positive logits (multiply the negative ones) of "
    "tokens already in the prompt or output, in [{:g}, {:g}]; 1 is "
    "off".format(*REPETITION_PENALTY_RANGE),
)


MAX_STOP = 16  # stop strings per request; each is checked against the output after every token
MAX_PHRASES = 64  # banned phrases per request; each token's text is checked against each
MAX_TEXT = 256  # characters in one stop string or banned phrase


def check_text(value, where: str = "") -> None:
    """Raise ValueError when a string in `value` (nested in lists and dicts, keys included) holds a lone UTF-16
    surrogate: JSON can carry one ("\\ud800"), but no UTF-8 text, tokenizer or response can."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"{at + ' ' if at else ''}holds a lone UTF-16 surrogate (U+{ord(v[e.start]):04X} at "
                    f"character {e.start}); send valid Unicode text"
                ) from None
        elif isinstance(v, dict):
            stack += [(k, at) for k in v] + [(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(x, f"{at}[{i}]" if at else f"[{i}]") for i, x in enumerate(v)]


class CheckedModel(BaseModel):
    """A request model whose every text field is checked for lone surrogates (a 400 naming the field)."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        check_text(value)
        return value


class StreamOptions(CheckedModel):
    include_usage: bool | None = False


class JsonSchemaFormat(CheckedModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(CheckedModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Extras(CheckedModel):
    """Shared checks and conversion; subclasses declare the fields (OpenAI's first, then lmforge's)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @field_validator("stop", "banned_phrases", check_fields=False)
    @classmethod
    def _bounded_texts(cls, value, info):
        texts = [value] if isinstance(value, str) else value or []
        most = MAX_STOP if info.field_name == "stop" else MAX_PHRASES
        if len(texts) > most or any(len(t) > MAX_TEXT for t in texts):
            raise ValueError(f"at most {most} strings of at most {MAX_TEXT} characters each")
        return value

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
            stop=stop,
            seed=self.seed,
            n=1 if self.n is None else self.n,
            logprobs=logprobs,
        )


class CompletionRequest(_Extras):
    """POST /v1/completions (https://platform.openai.com/docs/api-reference/completions/create)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=1)
    n: int | None = Field(default=1, ge=1, le=16)
    presence_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = TEMPERATURE
    top_p: float | None = 1.0
    user: str | None = None
    # ---- lmforge extras (not in the OpenAI API) ----
    top_k: int | None = TOP_K
    min_p: float | None = None
    repetition_penalty: float | None = REPETITION_PENALTY
    regex: str | None = None  # structured output: the completion matches this regular expression
    choice: list[str] | None = None  # structured output: the completion is exactly one of these
    banned_phrases: list[str] | None = None  # texts that never appear in the output (however spelled in tokens)
    response_format: ResponseFormat | None = None  # as in chat completions

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine settings for this request (banned phrases are the server's: see Server.attach_controls)."""
        if self.suffix:
            raise ApiError(400, "suffix is not supported: lmforge models do not fill in the middle", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ApiError(400, "best_of is not supported (only best_of == n)", "best_of")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
        return self._params(max_tokens, self.logprobs)


class FunctionCall(CheckedModel):
    name: str
    arguments: str  # JSON text


class MessageToolCall(CheckedModel):
    """A call an assistant message made (OpenAI's `tool_calls` entries)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(CheckedModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call they answer

    def template_dict(self) -> dict:
        """The message as chat templates take it (lmforge.serve.tools.template_messages finishes the job)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        """The content as text; content parts must be text parts (this server has no image input)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"content part type {part.get('type')!r} is not supported; only 'text'", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Extras):
    """POST /v1/chat/completions (https://platform.openai.com/docs/api-reference/chat/create)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=1, ge=1, le=16)
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = 0.0
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = TEMPERATURE
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # checked by lmforge.serve.tools.tool_request
    top_p: float | None = 1.0
    user: str | None = None
    functions: list[dict[str, Any]] | None = None  # deprecated by OpenAI for tools: refused, never dropped
    function_call: str | dict[str, Any] | None = None
    # ---- lmforge extras (not in the OpenAI API) ----
    top_k: int | None = TOP_K
    min_p: float | None = None
    repetition_penalty: float | None = REPETITION_PENALTY
    regex: str | None = None
    choice: list[str] | None = None
    banned_phrases: list[str] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.functions is not None or self.function_call is not None:
            raise ApiError(
                400,
                "functions and function_call are OpenAI's deprecated form of tools; send tools and tool_choice",
                "functions" if self.functions is not None else "function_call",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class TokenizeRequest(CheckedModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # tokenized after the chat template, as chat requests are


class DetokenizeRequest(CheckedModel):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(CheckedModel):
    """POST /v1/embeddings (https://platform.openai.com/docs/api-reference/embeddings/create)."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: int | None = Field(default=None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class LoadAdapterRequest(CheckedModel):
    """POST /v1/load_lora_adapter (vLLM's admin route): serve the adapter folder at lora_path as lora_name."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str


class UnloadAdapterRequest(CheckedModel):
    lora_name: str
