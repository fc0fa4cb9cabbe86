"""Fine-tuning data: files of conversations or text turned into token sequences with a loss mask.

An `Example` is the ids the model reads and, per token, whether the model's prediction of it is trained.

- Chat (.jsonl, one {"messages": [{"role", "content"}, ...]} per line): the conversation is rendered with the
  model's chat template (lmforge.templates) one message at a time, and only the assistant's turns are
  trained: the text the template adds for an assistant message after the generation prompt (its content and
  end marker, e.g. "<|im_end|>\\n", or " content\\n" for the plain "User:/Assistant:" template). With the plain
  template, which has no end token, the tokenizer's EOS is appended to each assistant turn, so a tuned model
  learns to stop. Each piece is tokenized on its own, exactly as `chat`/`serve` tokenize the rendered prompt
  before the reply is generated.
- Text (.jsonl lines {"text": ...}, or any other file as plain text): every token is trained; long text is cut
  into windows of the model's context.

Errors name the file and line: an empty file, a line that is not JSON, a conversation without an assistant turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.templates import PLAIN_TEMPLATE, ChatTemplate

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """Token ids and a same-length mask: mask[i] True trains the prediction of ids[i] (mask[0] is ignored)."""

    ids: list[int]
    mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise ValueError(f"Example has {len(self.ids)} ids but {len(self.mask)} mask entries")

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


class DataError(LmforgeError):
    """A fine-tuning data file that cannot be read; the message names the file and line."""


def encode_piece(tokenizer, text: str, first: bool) -> list[int]:
    """Tokens of one piece of a sequence. A llama2.c tokenizer adds BOS and its dummy-prefix space only to the
    first piece; later pieces are its bare merges of the text (what decoding after the prompt yields)."""
    if getattr(tokenizer, "kind", None) == "llama2c" and not first:
        from lmforge.tokenizer.llama2c import LLAMA2C_BYTE_OFFSET as BYTE_OFFSET

        ids: list[int] = []
        for ch in text:
            i = tokenizer.lookup.get(ch.encode("utf-8"))
            ids.extend([i] if i is not None else [b + BYTE_OFFSET for b in ch.encode("utf-8")])
        return tokenizer.merge(ids)
    return tokenizer.encode(text)


def render(template: ChatTemplate, messages: list[dict], generation_prompt: bool) -> str:
    return template.template.render(
        messages=messages,
        add_generation_prompt=generation_prompt,
        bos_token=template.bos_token,
        eos_token=template.eos_token,
    )


def chat_segments(template: ChatTemplate, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: assistant turns trained, everything else not.

    Piece boundaries come from rendering growing prefixes of the conversation, so they hold for any template
    that renders a prefix of the messages as a prefix of the text (every common template does).
    """
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(template, messages[:i], generation_prompt=True)
            full = render(template, messages[: i + 1], generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    "the chat template does not render a conversation's prefix as a prefix of its "
                    "text; it cannot be used to mask assistant turns"
                )
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
    tail = render(template, messages, generation_prompt=False)[len(done) :]
    return pieces + ([(tail, False)] if tail else [])


def chat_example(tokenizer, template: ChatTemplate | str, messages: list[dict]) -> Example:
    """An Example of a conversation, with the mask on the assistant turns' tokens only."""
    if isinstance(template, str):
        template = ChatTemplate(template, tokenizer)
    add_eos = template.source == PLAIN_TEMPLATE and getattr(tokenizer, "eos_id", None) is not None
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in chat_segments(template, messages):
        if not text:
            continue
        piece = encode_piece(tokenizer, text, first=not ids)
        if trained and add_eos:
            piece = piece + [tokenizer.eos_id]
        ids += piece
        mask += [trained] * len(piece)
    return Example(ids, mask)


def text_examples(tokenizer, text: str, block_size: int) -> list[Example]:
    """Text cut into windows of block_size + 1 tokens (consecutive windows share one token), all trained."""
    ids = tokenizer.encode(text)
    step = block_size
    return [
        Example(ids[i : i + step + 1], [True] * len(ids[i : i + step + 1]))
        for i in range(0, max(len(ids) - 1, 1), step)
        if len(ids[i : i + step + 1]) >= 2
    ]


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f'{where}: message {j} must be {{"role": one of {", ".join(ROLES)}, "content": '
                f"string}}, got {json.dumps(m)[:80]}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    return out


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of each line of a JSON-lines file; blank lines are skipped, a bad line is an error
    naming its number."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(record).__name__}")
            records.append((n, record))
    return records


def read_examples(path: str | Path, tokenizer, template: ChatTemplate | str, block_size: int) -> list[Example]:
    """Examples from a data file: .jsonl of {"messages": [...]} or {"text": ...}, or any other file as text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if tokenizer is None:
        raise ValueError("the base model has no tokenizer to encode the data; pass --tokenizer PATH")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: it holds no training data")
    if isinstance(template, str):
        template = ChatTemplate(template, tokenizer)
    if path.suffix != ".jsonl":
        examples = text_examples(tokenizer, path.read_text(encoding="utf-8"), block_size)
    else:
        examples = []
        for n, record in read_jsonl(path):
            where = f"{path}:{n}"
            if "messages" in record:
                examples.append(chat_example(tokenizer, template, check_messages(record["messages"], where)))
            elif isinstance(record.get("text"), str):
                examples += text_examples(tokenizer, record["text"], block_size)
            else:
                raise DataError(f'{where}: expected a "messages" list or a "text" string, got keys {sorted(record)}')
    if not examples:
        raise DataError(f"{path} holds no training data (no conversations or text)")
    return examples
