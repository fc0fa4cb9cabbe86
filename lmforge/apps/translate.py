"""Translation with a decoder-only model: sentence pairs in, a model folder that translates out.

A pair becomes one token sequence, the source inside a prompt and the target after it, ended by one end token:

    "I am hungry.\\n" + "我饿了。" + <|endoftext|>
     ^ prompt (not trained)   ^ target + end token (trained: lmforge.apps.finetune's masked loss)

The prompt format (`PromptFormat`: languages, template, end marker) is saved as `translate.json` in the model
folder, beside config.json, so `lmforge translate`, the bench and the trainer build prompts the same way. The
default template is the bare "{src}\\n": a model trained from scratch needs no language names, and every prompt
token costs compute ("English: {src}\\nChinese:" makes a pair 22.6 tokens long instead of 18.6).

- Data: tab-separated lines `source<TAB>target[<TAB>attribution]` (the Tatoeba/manythings.org format of
  /work/shared/data/translation/cmn.txt). `read_pairs` names the line of a missing column or bad UTF-8.
- Split: `split_pairs` orders the distinct source sentences by a seeded hash and fills test, then validation,
  then train, so it is deterministic, and the several translations of one source sentence never straddle splits.
- Tokenizer: byte-level BPE (lmforge.tokenizer) trained on the formatted training pairs, so both languages and
  the template words share one vocabulary. On cmn.txt a 4096-token BPE gives ~17 tokens a pair against ~41 for
  characters (English is ~3 characters a BPE token), for a vocabulary of about the same size (2,845 characters).
- Decoding: greedy in batches (lmforge.infer.generate.generate) or beam search (beam_search), one model call per
  step either way; a translation ends at the end token and is cut at a newline.
- Scoring: sacrebleu corpus BLEU with its Chinese tokenizer (tokenize="zh": each CJK character is a word) and chrF.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmforge.apps.sft import Example
from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_write_text, read_json
from lmforge.textfile import text_lines

FORMAT_FILE = "translate.json"


class TranslationDataError(LmforgeError):
    """A pairs file that cannot be read; the message names the file and line."""


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Pair:
    src: str
    tgt: str
    attribution: str = ""  # the licence/credit column (Tatoeba's CC-BY line), kept with the pair
    line: int = 0  # line number in the file it came from (1-based), for messages


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Pairs from a file of `source<TAB>target[<TAB>attribution]` lines (UTF-8; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    pairs = []
    for n, line in text_lines(path, TranslationDataError):
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            found = "one column" if len(cols) < 2 else "an empty " + ("source" if not cols[0].strip() else "target")
            raise TranslationDataError(
                f"{path}:{n}: expected 'source<TAB>target[<TAB>attribution]', found {found}: {line[:60]!r}"
            )
        pairs.append(Pair(cols[0].strip(), cols[1].strip(), "\t".join(cols[2:]).strip(), n))
    if not pairs:
        raise TranslationDataError(f"{path} holds no sentence pairs")
    return pairs


@dataclass
class Split:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]


def split_pairs(pairs: Sequence[Pair], n_test: int = 1000, n_val: int = 500, seed: int = 0) -> Split:
    """Deterministic train/val/test split with every translation of a source sentence in one split.

    Distinct source sentences are ordered by sha256(seed, source) and their pairs dealt to test until it holds
    n_test pairs, then to val until n_val (a source whose pairs would overfill a split is passed on to the next),
    then to train. The order inside each split is the file order.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.src, []).append(i)
    if n_test + n_val >= len(pairs):
        raise ValueError(f"n_test={n_test} + n_val={n_val} leaves no training pairs out of {len(pairs)}")
    order = sorted(groups, key=lambda s: hashlib.sha256(f"{seed}\t{s}".encode()).digest())
    test: list[int] = []
    val: list[int] = []
    train: list[int] = []
    for src in order:
        idx = groups[src]
        if len(test) + len(idx) <= n_test and len(test) < n_test:
            test += idx
        elif len(val) + len(idx) <= n_val and len(val) < n_val:
            val += idx
        else:
            train += idx
    return Split(*([pairs[i] for i in sorted(part)] for part in (train, val, test)))


# ------------------------------------------------------------------------------------------------ format


@dataclass
class PromptFormat:
    """How a source sentence becomes a prompt, and which token ends a translation."""

    source_lang: str = "English"
    target_lang: str = "Chinese"
    template: str = "{src}\n"  # the target follows directly; short, as every prompt token costs compute
    end: str | None = None  # one token: the tokenizer's EOS ("<|endoftext|>" for BPE), "\n" for chars; None: pick

    def __post_init__(self) -> None:
        if self.template.count("{src}") != 1:
            raise ValueError(f"translation template {self.template!r} must hold '{{src}}' exactly once")
        if self.end == "":
            raise ValueError("the translation end marker must not be empty")

    def with_end_for(self, tokenizer) -> PromptFormat:
        """This format with its end marker chosen for tokenizer when unset: its EOS token, else a newline."""
        if self.end is not None:
            return self
        eos = getattr(tokenizer, "eos_id", None)
        return replace(self, end=tokenizer.decode([eos]) if eos is not None else "\n")

    def prompt(self, src: str) -> str:
        return self.template.replace("{src}", src)

    def end_id(self, tokenizer) -> int:
        if self.end is None:
            raise ValueError("the translation format has no end marker yet; call with_end_for(tokenizer)")
        ids = tokenizer.encode(self.end)
        if len(ids) != 1:
            raise ValueError(
                f"the end marker {self.end!r} encodes to {len(ids)} tokens with this tokenizer; it must "
                f"be one token (the tokenizer's EOS, or a character in its vocabulary)"
            )
        return ids[0]

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / FORMAT_FILE
        atomic_write_text(path, json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> PromptFormat:
        path = Path(folder) / FORMAT_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path.parent} holds no {FORMAT_FILE}: not a translation model (train one with "
                f"lmforge.apps.translate.train_translator or bench/translate.py)"
            )
        expected = f"expected keys {sorted(asdict(cls()))}"
        d = read_json(path, "translation format", fix=expected)
        try:
            return cls(**d)
        except TypeError as e:
            raise LmforgeError(f"{path} is not a valid translation format ({e}); {expected}") from None


def pair_example(tokenizer, fmt: PromptFormat, src: str, tgt: str) -> Example:
    """ids = prompt tokens + target tokens + end token; only the target and the end token are trained."""
    prompt = tokenizer.encode(fmt.prompt(src))
    target = tokenizer.encode(tgt) + [fmt.end_id(tokenizer)]
    return Example(prompt + target, [False] * len(prompt) + [True] * len(target))


def format_texts(pairs: Sequence[Pair], fmt: PromptFormat) -> list[str]:
    """The text a tokenizer is trained on: each pair as the model will read it (without the end marker)."""
    return [fmt.prompt(p.src) + p.tgt for p in pairs]


# ------------------------------------------------------------------------------------------------ training


def step_seconds(config, examples: list[Example], batch_size: int, lr: float, steps: int = 6) -> float:
    """Seconds one training step takes for this model on these examples (a throwaway copy, median of steps)."""
    import random
    import time

    from lmforge.apps.finetune import collate, epoch_batches, masked_loss
    from lmforge.model import Transformer
    from lmforge.train.optim import make_optimizer

    model = Transformer(config).train()
    optimizer = make_optimizer(model, "adamw", lr)
    rng = random.Random(0)
    sample = rng.sample(examples, min(len(examples), batch_size * 32))  # files are often sorted by length
    times = []
    for batch in epoch_batches(sample, batch_size, rng)[: steps + 1]:
        t = time.perf_counter()
        loss = masked_loss(model, collate(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]  # the first step pays one-off allocation


def train_translator(
    train: Sequence[Pair],
    val: Sequence[Pair],
    out: str | os.PathLike,
    fmt: PromptFormat | None = None,
    tokenizer: str = "bpe",
    vocab_size: int | None = 4096,
    preset: str = "gpt-nano",
    model_overrides: dict | None = None,
    lr: float = 3e-3,
    batch_size: int = 32,
    max_minutes: float | None = None,
    epochs: float | None = None,
    warmup_iters: int = 100,
    weight_decay: float = 0.0,
    eval_interval: int = 200,
    seed: int = 0,
    on_eval=None,
) -> dict:
    """Train a translation model from scratch on pairs and write the run folder `out` (model folder: out/best).

    The tokenizer is trained on the formatted training pairs; a randomly initialised `preset` model (vocabulary
    from the tokenizer, `model_overrides` such as n_layer, n_embd, block_size) is then fully fine-tuned on them
    with lmforge.apps.finetune, the loss on the target side only, keeping the weights with the best validation
    loss. The budget is `max_minutes` of wall-clock time (tokenizer and setup included) and/or `epochs`. With a
    time budget the number of steps is set from a measured step time, so that the cosine learning-rate decay
    ends when the time does; finetune's own minute limit stops the run if the machine slows down.
    The prompt format, with its end marker filled in, is saved as out/best/translate.json.
    """
    import shutil
    import time

    from lmforge.apps.finetune import FinetuneConfig, evaluate_examples, finetune
    from lmforge.checkpoint import save_model
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.tokenizer import train_tokenizer

    t0 = time.time()
    if not train:
        raise ValueError("no training pairs")
    if max_minutes is None and epochs is None:
        raise ValueError("give a training budget: max_minutes and/or epochs")
    out = Path(out)
    fmt = fmt or PromptFormat()
    tok = train_tokenizer(tokenizer, format_texts(train, fmt), None if tokenizer == "char" else vocab_size)
    fmt = fmt.with_end_for(tok)
    train_ex = [pair_example(tok, fmt, p.src, p.tgt) for p in train]
    val_ex = [pair_example(tok, fmt, p.src, p.tgt) for p in val]
    config = ModelConfig.from_name(
        preset, **{"block_size": 128, **(model_overrides or {}), "vocab_size": tok.vocab_size}
    )
    torch.manual_seed(seed)
    init = out / "init"
    save_model(init, Transformer(config), tok)
    fmt.save(init)

    max_iters = None
    if max_minutes is not None:
        step = step_seconds(config, train_ex, batch_size, lr)
        eval_s = 0.0
        if val_ex:
            t = time.perf_counter()
            evaluate_examples(Transformer(config), val_ex)
            eval_s = time.perf_counter() - t
        left = 60 * max_minutes - (time.time() - t0) - eval_s - 2 * step  # the final evaluation and saving
        if left <= 0:
            raise ValueError(f"max_minutes={max_minutes} was used up by the tokenizer and setup; give more time")
        max_iters = max(1, int(0.97 * left / (step + eval_s / eval_interval)))
        if epochs is not None:
            max_iters = min(max_iters, math.ceil(epochs * len(train_ex) / batch_size))
        max_minutes = left / 60
    ft = FinetuneConfig(
        base=str(init),
        out=str(out),
        method="full",
        lr=lr,
        epochs=epochs,
        max_iters=max_iters,
        max_minutes=max_minutes,
        batch_size=batch_size,
        eval_interval=eval_interval,
        warmup_iters=warmup_iters,
        weight_decay=weight_decay,
        seed=seed,
    )
    summary = finetune(ft, train_ex, val_ex or None, on_eval=on_eval)
    shutil.rmtree(init, ignore_errors=True)  # the random start: reproducible from the seed
    fmt.save(summary["model_dir"])
    return {
        **summary,
        "train_minutes": (time.time() - t0) / 60,
        "train_pairs": len(train),
        "params": summary["total_params"],
        "vocab_size": tok.vocab_size,
        "tokens_per_pair": sum(len(e.ids) for e in train_ex) / len(train_ex),
    }


# ------------------------------------------------------------------------------------------------ decoding


def clean_output(text: str) -> str:
    """A decoded translation up to its first newline (the prompt format's line structure), stripped."""
    return text.split("\n", 1)[0].strip()


@torch.inference_mode()
def translate(
    model,
    tokenizer,
    fmt: PromptFormat,
    sources: Sequence[str],
    beam: int = 0,
    max_tokens: int = 64,
    length_penalty: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """Translate sources: greedy in length-sorted batches (beam=0), or beam search with `beam` beams each.

    Beam width 1 gives the greedy translation. Each output stops at the format's end token, after
    max_tokens, or where the model's context is full.
    """
    from lmforge.infer.generate import beam_search, generate
    from lmforge.infer.sampling import SamplingParams

    if beam < 0:
        raise ValueError(f"beam={beam} must be >= 0 (0: greedy, N: beam search with N beams)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    end = fmt.end_id(tokenizer)
    prompts = [tokenizer.encode(fmt.prompt(s)) for s in sources]
    block = model.config.block_size
    for i, p in enumerate(prompts):
        if len(p) >= block:
            raise ValueError(
                f"source {i} ({sources[i][:40]!r}...) makes a prompt of {len(p)} tokens; the model's "
                f"context is {block}, so it cannot be translated: split the sentence"
            )
    outputs: list[list[int]] = [[] for _ in prompts]
    if beam >= 1:
        for i, p in enumerate(prompts):
            n = min(max_tokens, block - len(p) + 1)
            outputs[i] = beam_search(model, p, beam, n, length_penalty, eos_id=end)[0][0]
    else:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            n = min(max_tokens, block - max(len(prompts[i]) for i in chunk) + 1)
            done = generate(
                model, [prompts[i] for i in chunk], SamplingParams(max_tokens=n, temperature=0.0), eos_id=end
            )
            for i, c in zip(chunk, done):
                outputs[i] = c.tokens
    return [clean_output(tokenizer.decode(t)) for t in outputs]


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, tokenize="zh") and chrF of hypotheses against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} translations but {len(references)} references")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="zh")
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score}


# ------------------------------------------------------------------------------------------------ loading, CLI


def load_translator(model: str, dtype: str = "float32"):
    """(model, tokenizer, PromptFormat) from a translation model folder or its run folder."""
    from lmforge.checkpoint import resolve_model_dir
    from lmforge.loader import load

    folder = resolve_model_dir(model)
    fmt = PromptFormat.load(folder)
    loaded = load(folder, dtype=dtype)
    net, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ValueError(f"{folder} holds no tokenizer; a translation model folder needs the one it was trained with")
    return net, tok, fmt


def translate_command(
    model: str,
    text: str = "",
    file: str | None = None,
    beam: int = 0,
    max_tokens: int = 64,
    length_penalty: float = 1.0,
) -> int:
    """Translate a sentence (or a file of them) with a translation model folder.

    Args:
        model: translation model folder (config.json, model.safetensors, tokenizer, translate.json) or its run folder.
        text: the sentence to translate.
        file: a UTF-8 file with one source sentence per line; translations are printed one per line, in order.
        beam: beam search with this many beams; 0 decodes greedily.
        max_tokens: tokens per translation at most.
        length_penalty: beam scores divide by length ** length_penalty.
    """
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"file {path} does not exist")
        try:
            sources = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 ({e})") from None
        if not sources:
            raise ValueError(f"{path} holds no sentences (one per line expected)")
    elif text.strip():
        sources = [text.strip()]
    else:
        raise ValueError("nothing to translate: pass --text SENTENCE or --file PATH")
    net, tok, fmt = load_translator(model)
    for line in translate(net, tok, fmt, sources, beam, max_tokens, length_penalty):
        print(line, flush=True)
    return 0
