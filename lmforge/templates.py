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
    def for_model(cls, folder: str | Path | None, tokenizer) -> "ChatTemplate":
        """The template in the model folder's tokenizer_config.json, else the default for this tokenizer."""
        source = read_chat_template(folder) if folder is not None else None
        return cls(source if source is not None else default_template(tokenizer), tokenizer)

    def render(self, messages: list[dict]) -> str:
        """Prompt text for `messages` ([{"role", "content"}, ...]) ending where the assistant's reply starts."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from e
