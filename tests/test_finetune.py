"""Fine-tuning (lmforge.apps.finetune, lmforge.apps.sft): loss masks on assistant tokens, the masked loss against a
per-token loop, the `lmforge finetune` CLI end to end, the saved chat template winning, and clear data errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.apps.finetune import collate, evaluate_examples, masked_loss
from lmforge.apps.sft import DataError, Example, chat_example, read_examples
from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.loader import load
from lmforge.model import Transformer
from lmforge.templates import CHATML_TEMPLATE, PLAIN_TEMPLATE, ChatTemplate
from lmforge.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT = (
    "the cat sat on the mat. the dog ran to the park and the bird sang in the tree. "
    "User: hello there. Assistant: hello, how are you? "
) * 20
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hello, how are you?"},
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "on the mat."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("bpe", [TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("ft") / "base"
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=64)
    )
    save_model(folder, model, tok)
    return folder


def trained_text(tok, ex: Example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, m in zip(ex.ids, ex.mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


def test_plain_template_masks_exactly_the_assistant_replies(tok):
    ex = chat_example(tok, PLAIN_TEMPLATE, CONVERSATION)
    eos = tok.decode([tok.eos_id])
    rendered = ChatTemplate(PLAIN_TEMPLATE, tok).template.render(messages=CONVERSATION, add_generation_prompt=False)
    assert (
        rendered == "Be brief.\n\nUser: hello there\nAssistant: hello, how are you?\nUser: the cat sat\n"
        "Assistant: on the mat.\n"
    )
    # the trained runs are each reply as the template renders it after "Assistant:", then EOS
    assert trained_text(tok, ex) == [" hello, how are you?\n" + eos, " on the mat.\n" + eos]
    assert tok.decode(ex.ids) == rendered.replace("you?\n", "you?\n" + eos).replace("mat.\n", "mat.\n" + eos)
    # the prompt of the first reply is what chat/serve feed the model: its tokens are the untrained prefix
    prompt = ChatTemplate(PLAIN_TEMPLATE, tok).render(CONVERSATION[:2])
    assert ex.ids[: ex.mask.index(True)] == tok.encode(prompt)


def test_chatml_template_trains_the_end_marker_not_the_role_header(tok):
    ex = chat_example(tok, CHATML_TEMPLATE, CONVERSATION)
    assert trained_text(tok, ex) == ["hello, how are you?<|im_end|>\n", "on the mat.<|im_end|>\n"]
    assert tok.decode(ex.ids).count("<|im_start|>assistant\n") == 2


def test_llama2c_pieces_decode_to_the_conversation():
    model_file = SHARED / "models" / "stories260K" / "stories260K.bin"
    if not model_file.exists():
        pytest.skip(f"stories260K not found at {model_file}")
    from lmforge.apps.finetune import load_base

    _, tok, template = load_base(str(model_file))
    ex = chat_example(tok, template, CONVERSATION[1:3])
    assert ex.ids[0] == tok.bos_id and ex.ids[-1] == tok.eos_id
    assert trained_text(tok, ex) == [" hello, how are you?\n"]  # decode drops EOS
    assert ex.ids[: ex.mask.index(True)] == tok.encode(ChatTemplate(template, tok).render(CONVERSATION[1:2]))


def test_masked_loss_matches_a_per_token_loop():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name("gpt-nano", vocab_size=30, n_layer=1, n_embd=16, n_head=2, block_size=16)
    ).eval()
    examples = [
        Example([1, 2, 3, 4, 5, 6], [False, False, False, True, True, False]),
        Example([7, 8, 9], [False, True, True]),
        Example([3, 3, 3, 3, 3, 3, 3, 3], [True] * 8),
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # each example alone, unpadded: sum -log p(ids[t] | ids[:t]) over trained t >= 1
            logp = F.log_softmax(model(torch.tensor([e.ids])), -1)[0]
            for t in range(1, len(e.ids)):
                if e.mask[t]:
                    total -= float(logp[t - 1, e.ids[t]])
                    count += 1
        batched = float(masked_loss(model, collate(examples)))
    assert count == 2 + 2 + 7
    assert batched == pytest.approx(total / count, rel=1e-5)
    assert evaluate_examples(model, examples, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    inputs, targets = collate(examples)
    assert inputs.shape == (3, 7) and (targets != -100).sum() == count


def write_chat(path, n=24):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]})
        for w in ["the cat", "the dog", "the bird", "the mat"] * (n // 4)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_finetune_cli_full_and_lora_end_to_end(base, tmp_path, capsys):
    data = write_chat(tmp_path / "chat.jsonl")
    template = tmp_path / "template.jinja"
    template.write_text(CHATML_TEMPLATE.replace("<|im_start|>", "[").replace("<|im_end|>", "]"), encoding="utf-8")
    assert (
        main(
            [
                "finetune",
                str(base),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "full"),
                "--method",
                "full",
                "--max-iters",
                "8",
                "--batch-size",
                "4",
                "--eval-interval",
                "4",
                "--lr",
                "3e-3",
                "--chat-template",
                str(template),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "full" and summary["iters"] == 8 and summary["trainable_fraction"] == 1.0
    assert summary["val_examples"] == 2 and summary["train_examples"] == 22  # a fixed 10% held out
    assert summary["best_val_loss"] < summary["base_val_loss"]
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 4, 8]
    model, _ = load_model(tmp_path / "full")  # the run folder resolves to best/
    # the template trained with is saved and wins over the base's default, in chat and serve alike
    saved = load(tmp_path / "full", prepare=False).chat_template()
    assert saved.source == template.read_text()

    assert (
        main(
            [
                "finetune",
                str(base),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "lora"),
                "--max-iters",
                "6",
                "--batch-size",
                "4",
                "--lora-rank",
                "2",
                "--lora-targets",
                "attn.qkv",
                "mlp.fc",
                "--chat-template",
                str(template),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "lora" and summary["model_dir"] is None and summary["trainable_fraction"] < 0.1
    adapter = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 2 and adapter["base_model_name_or_path"] == str(base)
    assert adapter["target_modules"] == ["attn.c_attn", "mlp.c_fc"]  # PEFT's names in the exported GPT-2
    assert load(base, adapter=tmp_path / "lora", prepare=False).template_folder == tmp_path / "lora" / "adapter"
    from lmforge.serve.chat import LocalBackend

    backend = LocalBackend(str(base), str(tmp_path / "lora"))  # what `lmforge chat BASE --adapter OUT` loads
    assert backend.template.source == template.read_text()
    assert load(base, prepare=False).chat_template().source == PLAIN_TEMPLATE  # the base's own
    assert (
        main(
            [
                "generate",
                str(base),
                "--adapter",
                str(tmp_path / "lora"),
                "--prompt",
                "say the",
                "--max-tokens",
                "3",
                "--temperature",
                "0",
            ]
        )
        == 0
    )


def test_text_data_trains_every_token(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    examples = read_examples(path, tok, PLAIN_TEMPLATE, block_size=16)
    ids = tok.encode(TEXT)
    assert all(all(e.mask) and len(e.ids) <= 17 for e in examples)
    assert examples[0].ids == ids[:17] and examples[1].ids == ids[16:33]  # every token predicted once


def test_data_errors_name_the_file_and_line(tok, base, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        read_examples(empty, tok, PLAIN_TEMPLATE, 32)
    bad = write_chat(tmp_path / "bad.jsonl", n=4)
    bad.write_text(bad.read_text() + '{"messages": [\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:5: not valid JSON"):
        read_examples(bad, tok, PLAIN_TEMPLATE, 32)
    no_reply = tmp_path / "no_reply.jsonl"
    no_reply.write_text('\n{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no_reply\.jsonl:2: .*no assistant message"):
        read_examples(no_reply, tok, PLAIN_TEMPLATE, 32)
    role = tmp_path / "role.jsonl"
    role.write_text('{"messages": [{"role": "bot", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"role\.jsonl:1: message 0 must be"):
        read_examples(role, tok, PLAIN_TEMPLATE, 32)
    # through the CLI: exit status 1 and the message on stderr
    assert main(["finetune", str(base), "--data", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "bad.jsonl:5" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                str(base),
                "--data",
                str(write_chat(tmp_path / "ok.jsonl", 4)),
                "--out",
                str(tmp_path / "y"),
                "--lora-targets",
                "attn.k",
            ]
        )
        == 1
    )
    assert "unknown LoRA target" in capsys.readouterr().err


def test_an_earlier_run_is_kept_unless_overwritten_and_the_settings_are_saved(base, tmp_path, capsys):
    data = write_chat(tmp_path / "chat.jsonl", 8)
    argv = [
        "finetune",
        str(base),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--max-iters",
        "2",
        "--batch-size",
        "4",
        "--lora-rank",
        "2",
    ]
    assert main(argv) == 0
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(argv + ["--lora-rank", "4"]) == 1
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--overwrite" in err and "--resume" not in err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (
        main(["finetune", "--config", str(tmp_path / "run" / "finetune.yaml"), "--lora-rank", "4", "--overwrite"]) == 0
    )  # the saved settings, one changed
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iters"] == 2
