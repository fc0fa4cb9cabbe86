"""Chat templates: how a list of messages becomes the prompt text a model was trained on.

Each model carries its template as Hugging Face tokenizer configs do: the Jinja source in
`tokenizer_config.json` under `chat_template` (a string, or a list of {"name", "template"} where "default" is
the one used), beside the weights; imports from Hugging Face keep that file. Templates come from model files,
which are not trusted code, so they are rendered in jinja2's immutable sandbox. Rendering always asks for the
assistant's turn (`add_generation_prompt=True`).

Models without a template get one of two defaults: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`) when the
tokenizer has `<|im_start|>`/`<|im_end|>` as tokens, else plain text ("User: ...\\nAssistant:"), which a small
model trained on prose continues sensibly and which needs no special tokens.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError
from lmforge.fsutil import read_json

TEMPLATE_FILE = "tokenizer_config.json"  # the file that carries a model's chat template

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


def read_chat_template(folder: str | Path) -> str | None:
    """The `chat_template` of `folder/tokenizer_config.json`, or None when there is none."""
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
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
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
