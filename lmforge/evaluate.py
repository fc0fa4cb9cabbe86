"""Evaluation: loss, perplexity and (for character data) bits per character on a prepared split; and next-line
exact match, the code-completion score.

By default the split is cut into non-overlapping windows of the model's context, as the PyTorch
word_language_model example evaluates, so early tokens of each window see little context. A stride shorter
than the context slides the window and scores only each window's last `stride` targets: every token is
scored once, with at least `block_size - stride` tokens of context (slower, lower perplexity).

Next-line exact match (docs/code-completion.md) asks the model to write the next line of a file, as an editor's
completion would: the split's files (its eos-separated documents) are decoded, a seeded sample of their code
lines is taken, and for each the model sees the file up to the end of the previous non-blank line and greedily
writes on until it has finished a line. The score is the share of lines it writes exactly (trailing whitespace
aside, indentation included).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data import eval_windows, load_meta, load_split
from lmforge.errors import LmforgeError


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    data,
    *,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    max_windows: int | None = None,
) -> dict:
    """Mean next-token loss over `data` (a 1-D token array), with perplexity. Returns loss, ppl, tokens."""
    block_size = block_size or model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i, (x, y, mask) in enumerate(eval_windows(data, block_size, stride, batch_size)):
        if max_windows is not None and i * batch_size >= max_windows:
            break
        logits = model(x.to(device)).float()  # (B, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none")
        mask = mask.to(device).flatten()
        loss_sum += float((ce * mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


# ---------------------------------------------------------------------------------- next-line exact match


def split_documents(ids: np.ndarray, eos_id: int | None) -> list[np.ndarray]:
    """A prepared split cut back into its documents at the eos tokens prepare put after each (none: one)."""
    ids = np.asarray(ids)
    if eos_id is None:
        return [ids] if len(ids) else []
    cuts = np.flatnonzero(ids == eos_id)
    starts, ends = np.concatenate([[0], cuts + 1]), np.concatenate([cuts, [len(ids)]])
    return [ids[a:b] for a, b in zip(starts, ends) if b > a]


def line_targets(text: str) -> list[tuple[int, int, int]]:
    """The lines of `text` next-line completion scores, as (cut, start, end) character offsets.

    A target is a line with code on it: not blank, not a comment-only line (its first non-blank character is
    `#`), and with a non-blank line somewhere before it in the file. Docstring lines count: they are written
    too. The model's context is text[:cut], which ends at the last non-whitespace character before the line, and
    the line is text[start:end]. Cutting before the line break, rather than after it, keeps the context a prefix
    of the file's own tokens: byte-level BPE merges a line break with the next line's indentation.
    """
    targets, start, last_end = [], 0, None
    for line in text.split("\n"):
        code = line.strip()
        if code and not code.startswith("#") and last_end is not None:
            targets.append((last_end, start, start + len(line)))
        if code:
            last_end = start + len(line.rstrip())
        start += len(line) + 1
    return targets


def predicted_line(continuation: str) -> tuple[str | None, bool]:
    """The line a continuation of the context writes, and whether it is finished.

    The continuation must start with whitespace holding a line break (blank lines allowed); the line runs from
    the last such break to the next one. A continuation that puts code on the context's own last line predicts
    no line (None): a miss, decided as soon as that code appears.
    """
    body = continuation.lstrip()
    lead = continuation[: len(continuation) - len(body)]
    if "\n" not in lead:
        return None, bool(body)
    line = continuation[lead.rindex("\n") + 1 :]
    end = line.find("\n")
    return (line, False) if end < 0 else (line[:end], True)


def sample_line_targets(documents: Sequence[str], lines: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """`lines` targets drawn without replacement from all documents' `line_targets`, by a seeded RNG, in file
    order: (document index, cut, start, end). Fewer when the documents have fewer."""
    candidates = [(d, *t) for d, text in enumerate(documents) for t in line_targets(text)]
    return sorted(random.Random(seed).sample(candidates, min(lines, len(candidates))))


def line_prompt(tokenizer, text: str, cut: int, context: int) -> list[int]:
    """The last `context` tokens of eos + text[:cut]: a context that reaches the file's start begins with the
    eos token, as every file but the first did in training."""
    eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    return (eos + tokenizer.encode(text[:cut]))[-context:]


@torch.inference_mode()
def complete_lines(
    model,
    tokenizer,
    documents: Sequence[str],
    targets: Sequence[tuple[int, int, int, int]],
    *,
    max_line_tokens: int = 48,
    batch_size: int = 16,
) -> list[str | None]:
    """The line the model writes at each target: greedy decoding by `lmforge.infer.generate`, batched.

    The context is the last `block_size - max_line_tokens` tokens before the cut, so that it and the completion fit
    the model's context. A row ends at eos, after `max_line_tokens` tokens, or once its line is finished (then
    only eos is allowed next, which ends it early; the text is the same as decoding on).
    """
    from lmforge.infer.generate import continuation_text, generate
    from lmforge.infer.sampling import SamplingParams

    context = model.config.block_size - max_line_tokens
    if context < 1:
        raise ValueError(
            f"max_line_tokens={max_line_tokens} leaves no room for context in the model's "
            f"block_size={model.config.block_size}; lower it"
        )
    eos = getattr(tokenizer, "eos_id", None)

    def params(prompt: list[int]) -> SamplingParams:
        def allowed(out: Sequence[int]):
            return [eos] if out and predicted_line(continuation_text(tokenizer, prompt, out))[1] else None

        return SamplingParams(
            max_tokens=max_line_tokens, temperature=0.0, allowed_tokens=allowed if eos is not None else None
        )

    was_training = model.training
    model.eval()
    lines: list[str | None] = []
    for k in range(0, len(targets), batch_size):
        prompts = [line_prompt(tokenizer, documents[d], cut, context) for d, cut, _, _ in targets[k : k + batch_size]]
        for prompt, c in zip(prompts, generate(model, prompts, [params(p) for p in prompts], tokenizer=tokenizer)):
            lines.append(predicted_line(continuation_text(tokenizer, prompt, c.tokens))[0])
    model.train(was_training)
    return lines


def next_line_exact_match(
    model,
    tokenizer,
    documents: Sequence[str],
    lines: int = 200,
    *,
    seed: int = 0,
    max_line_tokens: int = 48,
    batch_size: int = 16,
) -> dict:
    """Share of `lines` sampled code lines of `documents` the model writes exactly (see `complete_lines`).

    Lines compare after stripping trailing whitespace; indentation counts. Returns next_line_exact_match,
    next_line_count (lines scored) and next_line_candidates (lines there were to sample from).
    """
    if getattr(tokenizer, "kind", None) == "word":
        raise ValueError(
            "next-line evaluation needs a tokenizer that decodes text exactly (char or bpe); "
            "a word tokenizer loses spacing and line structure"
        )
    targets = sample_line_targets(documents, lines, seed)
    predicted = complete_lines(
        model, tokenizer, documents, targets, max_line_tokens=max_line_tokens, batch_size=batch_size
    )
    hits = sum(
        p is not None and p.rstrip() == documents[d][start:end].rstrip()
        for p, (d, _, start, end) in zip(predicted, targets)
    )
    return {
        "next_line_exact_match": hits / max(len(targets), 1),
        "next_line_count": len(targets),
        "next_line_candidates": sum(len(line_targets(text)) for text in documents),
    }


# ---------------------------------------------------------------------------------- same tokens?


class TokenizerMismatch(LmforgeError):
    """Data whose token ids mean other text to the model than they did to the tokenizer that made them."""


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what every token id stands for (its text, decoded alone), in id order: two tokenizers with the
    same digest give every id the same meaning, whatever their files or classes look like."""
    vocab = getattr(tokenizer, "vocab", None)  # char and word tokenizers hold their pieces
    if isinstance(vocab, list):
        pieces = vocab
    elif hasattr(getattr(tokenizer, "tok", None), "decode_batch"):  # a Hugging Face tokenizer, batched
        pieces = tokenizer.tok.decode_batch([[i] for i in range(tokenizer.vocab_size)])
    else:
        pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def check_same_tokenizer(model_tok, data: str, model: str) -> None:
    """Refuse data prepared with another tokenizer than the model's (the ids would be scored as other text).
    The digests are computed from the tokenizers both folders keep, so folders of any age are compared; where
    either has none, a line on stderr says that nothing was checked."""
    from lmforge.tokenizer import load_tokenizer

    try:
        data_tok = load_tokenizer(data)
    except (ValueError, OSError):
        data_tok = None
    if model_tok is None or data_tok is None:
        which = "the model" if model_tok is None else f"the data folder {data}"
        print(
            f"lmforge eval: {which} keeps no tokenizer: cannot check that the data was made with the model's",
            file=sys.stderr,
        )
        return
    if tokenizer_digest(model_tok) != tokenizer_digest(data_tok):
        raise TokenizerMismatch(
            f"the data in {data} was made with another tokenizer than the model's ({data_tok.vocab_size} vs "
            f"{model_tok.vocab_size} tokens, different pieces): its ids would be scored as other text. Prepare the "
            f"data with the model's tokenizer ({prepare_hint(model)})",
            param="data",
        )


def prepare_hint(model) -> str:
    """The commands that prepare data with `model`'s tokenizer (a .gguf file's is read from its imported folder)."""
    if str(model).endswith(".gguf"):
        return f"`lmforge import {model} MODEL_DIR`, then `lmforge prepare SOURCE --out DIR --tokenizer-from MODEL_DIR`"
    return f"`lmforge prepare SOURCE --out DIR --tokenizer-from {model}`"


# ---------------------------------------------------------------------------------- the CLI


def eval_command(
    model: str,
    data: str,
    split: str = "val",
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    next_line: int = 0,
    seed: int = 0,
    max_line_tokens: int = 48,
) -> int:
    """Report loss, perplexity and, for character data, bits per character of a model on a prepared split;
    with --next-line N, also next-line exact match on N sampled code lines of the split's files.

    Args:
        model: a model folder or training run (its best/ checkpoint), quantized ones included.
        data: a data folder made by `lmforge prepare` with the model's tokenizer (data made with another one is
            refused).
        split: which split to score (train, val or test, as prepared).
        block_size: window length (default: the model's context).
        stride: slide windows by this many tokens and score only the last `stride` of each (default:
            non-overlapping windows).
        batch_size: windows per forward pass (and prompts per generate batch for --next-line).
        next_line: score next-line completion on this many lines sampled from the split's files (0: skip),
            e.g. `--split test --next-line 200` on data prepared with --holdout-files (docs/code-completion.md).
        seed: seed of the next-line sample.
        max_line_tokens: tokens a next-line completion may use; the context is the model's block_size minus
            this.
    """
    from lmforge.loader import load

    loaded = load(model, prepare=False)
    net, model_tok = loaded.model, loaded.tokenizer
    meta = load_meta(data)
    check_same_tokenizer(model_tok, data, model)
    if meta["vocab_size"] > net.config.vocab_size:
        raise ValueError(
            f"data in {data} has a vocabulary of {meta['vocab_size']} tokens but the model knows "
            f"{net.config.vocab_size}: prepare the data with the model's tokenizer "
            f"({prepare_hint(model)})"
        )
    tokens = load_split(data, split)
    t0 = time.perf_counter()
    result = evaluate(net, tokens, block_size=block_size, stride=stride, batch_size=batch_size)
    result.update(
        model=model, split=split, quantization=net.config.quantization, seconds=round(time.perf_counter() - t0, 2)
    )
    if meta.get("tokenizer") == "char":
        result["bpc"] = result["loss"] / math.log(2)
    if next_line > 0:
        from lmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(data)  # the ids of the split are this tokenizer's
        documents = [tok.decode(doc.tolist()) for doc in split_documents(tokens, tok.eos_id)]
        t0 = time.perf_counter()
        result.update(
            next_line_exact_match(
                net, tok, documents, next_line, seed=seed, max_line_tokens=max_line_tokens, batch_size=batch_size
            )
        )
        result["next_line_seconds"] = round(time.perf_counter() - t0, 2)
        if meta.get("holdout_files") and split == "test":
            result["holdout_files"] = meta["holdout_files"]
    print(json.dumps(result))
    return 0
