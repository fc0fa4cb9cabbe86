"""Chat templates: how a list of messages becomes the prompt text a model was trained on.

Each model carries its template as Hugging Face model folders do: the Jinja source in `chat_template.jinja`
(transformers 5 writes it, and it wins), else in `tokenizer_config.json` under `chat_template` (a string, or a
list of {"name", "template"} where "default" is the one used), beside the weights; imports from Hugging Face keep
both files. Templates come from model files, which are not trusted code, so they are rendered in jinja2's
immutable sandbox, with the globals and filters transformers' `apply_chat_template` gives them (raise_exception,
strftime_now, loop controls, a tojson that keeps non-ASCII text), so a model's template renders the same text
here as there. Rendering always asks for the assistant's turn (`add_generation_prompt=True`).

Models without a template get one of two defaults: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`) when the
tokenizer has `<|im_start|>`/`<|im_end|>` as tokens, else plain text ("User: ...\\nAssistant:"), which a small
model trained on prose continues sensibly and which needs no special tokens.

Tools (OpenAI's function tools, `render(messages, tools)`) reach a model's own template as `tools=`, the way
Hugging Face templates take them, with assistant `tool_calls` and "tool" messages as they come. The defaults
have no place for tools, so they get lmforge's tool format, written into the messages (`lmforge_tool_messages`):
the system message lists the tools, one JSON object a line inside <tools></tools>, and says to answer a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen syntax, which
lmforge.serve.tools parses); an assistant turn's calls are written that way after its text, and a tool's result
is a "tool" turn holding it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError
from lmforge.fsutil import read_json

TEMPLATE_FILE = "tokenizer_config.json"  # the file that carries a model's chat template ("chat_template")
JINJA_FILE = "chat_template.jinja"  # transformers 5's file for it, which wins when both are there

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(LmforgeError):
    """A template that fails to load or render; the message names the file or the messages' problem."""


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: JSON as json.dumps writes it (jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)  # Llama 3.x templates date their system header with it


def read_chat_template(folder: str | Path) -> str | None:
    """The template of `folder/chat_template.jinja`, else the `chat_template` of `folder/tokenizer_config.json`,
    or None when there is none."""
    jinja = Path(folder) / JINJA_FILE
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{jinja} is not UTF-8 text ({e}); fix or remove it") from e
        if template.strip():
            return template
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    config = read_json(path, "tokenizer config", ChatTemplateError, "fix or remove it")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one serves chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _token_text(tokenizer, token_id) -> str:
    if token_id is None or tokenizer is None:
        return ""
    try:
        return tokenizer.decode([token_id])
    except (ValueError, TypeError):
        return ""


def default_template(tokenizer) -> str:
    """ChatML when the tokenizer has its markers as tokens, else the plain "User:/Assistant:" template."""
    tok = getattr(tokenizer, "tok", None)
    if tok is not None and tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None:
        return CHATML_TEMPLATE
    return PLAIN_TEMPLATE


class ChatTemplate:
    """A compiled template plus the special-token strings templates refer to (bos_token, eos_token)."""

    def __init__(self, source: str, tokenizer=None):
        self.source = source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e
        self.bos_token = _token_text(tokenizer, getattr(tokenizer, "bos_id", None))
        self.eos_token = _token_text(tokenizer, getattr(tokenizer, "eos_id", None))
        self.is_plain = source == PLAIN_TEMPLATE

    @property
    def turn_stops(self) -> list[str]:
        """Text that ends the assistant's turn when no token does: the plain template's next "User:" line, or
        ChatML's <|im_end|> when it is not the tokenizer's EOS (an EOS token already ends the output)."""
        if self.is_plain:
            return ["\nUser:"]
        if "<|im_end|>" in self.source and self.eos_token != "<|im_end|>":
            return ["<|im_end|>"]
        return []

    @classmethod
    def for_model(cls, folder: str | Path | None, tokenizer) -> ChatTemplate:
        """The template in the model folder's tokenizer_config.json, else the default for this tokenizer."""
        source = read_chat_template(folder) if folder is not None else None
        return cls(source if source is not None else default_template(tokenizer), tokenizer)

    @property
    def is_default(self) -> bool:
        """Whether this is one of lmforge's defaults (which write tools in lmforge's format)."""
        return self.source in (CHATML_TEMPLATE, PLAIN_TEMPLATE)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """Prompt text for `messages` ([{"role", "content"}, ...]; assistant messages may carry "tool_calls",
        "tool" messages answer one) ending where the assistant's reply starts; `tools` as OpenAI gives them."""
        if self.is_default and (tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)):
            messages, tools = lmforge_tool_messages(messages, tools), None
        extra = {"tools": tools} if tools else {}
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from e


TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more of these functions to help with the user's request:\n"
    "<tools>\n{tools}\n</tools>\n\nTo call a function, answer with one line per call:\n"
    '<tool_call>{{"name": <function name>, "arguments": <arguments as a JSON object>}}</tool_call>'
)


def tool_call_text(name: str, arguments) -> str:
    """One call in lmforge's tool format."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def lmforge_tool_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages with the tools, the calls and their results written as text in lmforge's tool format (see the
    module docstring), for templates that have no place for them."""
    out = [dict(m) for m in messages]
    if tools:
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content') or ''}\n\n{listing}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": listing})
    for m in out:
        calls = m.pop("tool_calls", None) or []
        lines = [tool_call_text(c["function"]["name"], c["function"].get("arguments", {})) for c in calls]
        if lines:
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + lines)
    return out
