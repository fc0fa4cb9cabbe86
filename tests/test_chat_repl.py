"""`lmforge chat` as a person uses it: a subprocess fed lines on stdin, locally and against a running server."""

import os
import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.serve.chat import ChatError, ChatSettings, sse_text_deltas
from lmforge.serve.process import start_server, stop_server
from lmforge.tokenizer import train_tokenizer

TEXT = (
    "the cat sat on the mat. the dog ran to the park and the bird sang in the tree. "
    "User: hello there. Assistant: hello, how are you? "
) * 20

LMFORGE = [sys.executable, "-m", "lmforge"]


def tiny_model_folder(folder, block_size=256):
    """A random 2-layer model with a byte-level BPE tokenizer: enough to chat with (nonsense) in milliseconds."""
    tok = train_tokenizer("bpe", [TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, block_size=block_size))
    save_model(folder, model, tok)
    return str(folder)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("chat") / "model")


def run_chat(args, lines, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*LMFORGE, "chat", *args],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def answers(output: str) -> list[str]:
    """The text after each `assistant> ` prompt up to the next `you> ` prompt (a sampled answer may hold or start
    with a line break), one per answered message."""
    return [
        part.split("assistant> ", 1)[1].split("\nyou> ", 1)[0]
        for part in output.split("\nyou> ")[1:]
        if "assistant> " in part
    ]


SCRIPT = [
    "the cat sat",
    "/set temperature 0",
    "/settings",
    "the dog ran",
    "/reset",
    "the dog ran",
    "/system be brief",
    "/set top_p 2",
    "/set nonsense 1",
    "/help",
    "/quit",
    "never read",
]


def check_session(out: str) -> None:
    replies = answers(out)
    assert len(replies) == 3 and all(r.strip() for r in replies), out  # each message got a streamed answer
    assert "temperature = 0.0" in out and "temperature=0.0" in out  # /set echoes, /settings shows it
    assert "conversation reset" in out
    assert "system prompt set to 'be brief'" in out
    assert "top_p=2 is out of range" in out and "unknown setting 'nonsense'" in out
    assert "/system TEXT" in out  # /help
    assert "never read" not in out  # /quit stopped reading


def test_local_chat_session(model_folder):
    out = run_chat([model_folder, "--max-tokens", "12"], SCRIPT)
    check_session(out)
    # /reset really forgets: a fresh greedy session asked the same thing answers exactly as after /reset.
    fresh = run_chat([model_folder, "--max-tokens", "12", "--temperature", "0"], ["the dog ran", "/quit"])
    assert answers(fresh)[0] == answers(out)[2]


def test_chat_without_model_or_url_is_a_clear_error():
    done = subprocess.run([*LMFORGE, "chat"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--url" in done.stderr


def test_settings_are_checked():
    s = ChatSettings()
    s.set("max_tokens", "5")
    s.set("seed", "7")
    assert (s.max_tokens, s.seed) == (5, 7)
    s.set("seed", "none")
    assert s.seed is None
    with pytest.raises(ChatError, match="max_tokens=0 is out of range"):
        s.set("max_tokens", "0")
    with pytest.raises(ChatError, match="is not an integer"):
        s.set("top_k", "1.5")


def test_sse_parsing_reads_deltas_until_done():
    lines = [
        ": keep-alive",
        'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}',
        "",
        'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        "",
        'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}',
        "",
        "data: [DONE]",
        "",
        'data: {"choices":[{"index":0,"delta":{"content":"after done"}}]}',
    ]
    assert list(sse_text_deltas(lines)) == ["Hel", "lo"]
    with pytest.raises(ChatError, match="boom"):
        list(sse_text_deltas(['data: {"error": {"message": "boom"}}']))


def test_chat_against_a_running_server(model_folder):
    proc, url = start_server(model_folder, "--api-key", "sekrit")
    try:
        out = run_chat(["--url", url, "--api-key", "sekrit", "--max-tokens", "12"], SCRIPT)
        check_session(out)
        # The server renders the same template and decodes greedily the same way as the local model.
        local = run_chat([model_folder, "--max-tokens", "12", "--temperature", "0"], ["the dog ran", "/quit"])
        assert answers(out)[2] == answers(local)[0]
        # A wrong key is refused with a message that names the fix.
        bad = subprocess.run(
            [*LMFORGE, "chat", "--url", url, "--api-key", "wrong"],
            input="hi\n/quit\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "--api-key" in bad.stderr
    finally:
        stop_server(proc)
