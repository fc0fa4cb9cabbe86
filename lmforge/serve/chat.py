"""`lmforge chat`: a terminal chat with a model, streamed token by token, with history and settings.

Two backends speak the same small interface -- `reply(messages, settings)` yields text deltas:
- `LocalBackend` loads a model folder in this process, renders the conversation with the model's chat template
  (`lmforge.templates`) and streams it with `lmforge.infer.generate.stream`;
- `RemoteBackend` talks to a running `lmforge serve` (or any OpenAI-compatible server) over HTTP, reading the
  server-sent events of `/v1/chat/completions` with `stream: true`.

`ChatSession` holds the conversation and the settings and turns each input line into either a message to the
model or a slash command (`/help` lists them). It reads lines and writes text through plain file objects, so a
test drives it with pipes exactly as a person would with a keyboard.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal, TextIO

from lmforge.errors import LmforgeError


class ChatError(LmforgeError):
    """A bad chat setting or an unreachable/failing server; the message names the value and the fix."""


@dataclass
class ChatSettings:
    """Sampling settings the user can change with `/set NAME VALUE`; names follow the OpenAI chat API."""

    temperature: float = 0.7
    max_tokens: int = 256
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def set(self, name: str, value: str) -> None:
        """Parse and check one setting; raises ChatError naming the setting and the allowed values."""
        kinds = {f.name: f for f in fields(self)}
        if name not in kinds:
            raise ChatError(f"unknown setting {name!r}; settings: {', '.join(kinds)}")
        cast = int if name in ("max_tokens", "top_k", "seed") else float
        if name == "seed" and value.lower() in ("none", "off", ""):
            self.seed = None
            return
        try:
            parsed = cast(value)
        except ValueError:
            raise ChatError(f"{name}={value!r} is not a{'n integer' if cast is int else ' number'}") from None
        allowed = {
            "temperature": (parsed >= 0, ">= 0 (0 is greedy)"),
            "max_tokens": (parsed >= 1, ">= 1"),
            "top_p": (0 < parsed <= 1, "in (0, 1]"),
            "top_k": (parsed >= 0, ">= 0 (0 keeps all)"),
            "seed": (True, ""),
        }
        ok, rule = allowed[name]
        if not ok:
            raise ChatError(f"{name}={value} is out of range: it must be {rule}")
        setattr(self, name, parsed)


# ---------------------------------------------------------------------------------- backends


class LocalBackend:
    """A model folder loaded in this process; the conversation is re-rendered and re-prefilled every turn."""

    def __init__(
        self, model: str, adapter: str | None = None, controls: str | None = None, quantize: str | None = None
    ):
        from lmforge.loader import load

        loaded = load(model, dtype="float32", adapter=adapter, quantize=quantize)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if self.tokenizer is None:
            raise ChatError(f"{model} has no tokenizer; chat needs a model folder with one")
        self.template = loaded.chat_template()
        # Where the assistant's turn ends: the plain template's next "User:" line, else the template's EOS text
        # (ChatML's <|im_end|> when it is not the tokenizer's EOS token, which already ends a row).
        self.stop = (
            ["\nUser:"] if self.template.is_plain else (["<|im_end|>"] if "<|im_end|>" in self.template.source else [])
        )
        self.name = model
        self.controls = None  # banned phrases and word biases (lmforge.infer.controls), and their fires so far
        self.control_counts: dict = {}
        if controls is not None:
            from lmforge.infer.controls import Controls

            self.controls = Controls.from_file(controls, self.tokenizer, self.model.config.vocab_size)

    def prompt(self, messages: list[dict], max_tokens: int) -> list[int]:
        """The rendered conversation's tokens, dropping the oldest turns (then the oldest tokens) so that the
        prompt plus max_tokens fits the model's context."""
        budget = self.model.config.block_size - max_tokens
        if budget < 1:
            raise ChatError(
                f"max_tokens={max_tokens} leaves no room for the prompt in the model's context of "
                f"{self.model.config.block_size}; /set max_tokens lower"
            )
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system) :]
        while True:
            ids = self.tokenizer.encode(self.template.render(system + turns))
            if len(ids) <= budget or len(turns) <= 1:
                return ids[-budget:]
            turns = turns[1:]

    def reply(self, messages: list[dict], settings: ChatSettings) -> Iterator[str]:
        import torch

        from lmforge.infer.generate import stream
        from lmforge.infer.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            stop=self.stop,
        )
        guard = self.controls.attach(params) if self.controls is not None else None
        try:
            with torch.inference_mode():
                for event in stream(
                    self.model, [self.prompt(messages, settings.max_tokens)], params, tokenizer=self.tokenizer
                ):
                    if event.text:
                        yield event.text
        finally:
            if guard is not None:
                from lmforge.infer.controls import merge_counts

                merge_counts(self.control_counts, guard.counts())


class RemoteBackend:
    """An OpenAI-compatible server: POST /v1/chat/completions with stream=true, read `data:` lines until [DONE]."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=300.0))
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        """The id of the server's first model (GET /v1/models), which requests must name."""
        import httpx

        try:
            response = self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise ChatError(f"cannot reach the server at {self.url} ({e}); is `lmforge serve` running there?") from e
        self._check(response)
        models = response.json().get("data") or []
        if not models:
            raise ChatError(f"the server at {self.url} lists no models at /v1/models")
        return models[0]["id"]

    def _check(self, response) -> None:
        if response.status_code == 401:
            raise ChatError(f"the server at {self.url} refused the API key (401); pass the right one with --api-key")
        if response.status_code >= 400:
            response.read()
            raise ChatError(f"the server at {self.url} answered {response.status_code}: {response.text[:300]}")

    def reply(self, messages: list[dict], settings: ChatSettings) -> Iterator[str]:
        import httpx

        body = {
            "model": self.name,
            "messages": messages,
            "stream": True,
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "top_p": settings.top_p,
        }
        if settings.top_k:
            body["top_k"] = settings.top_k  # a vLLM-style extra; OpenAI itself has no top_k
        if settings.seed is not None:
            body["seed"] = settings.seed
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
                self._check(response)
                yield from sse_text_deltas(response.iter_lines())
        except httpx.HTTPError as e:
            raise ChatError(f"the connection to {self.url} failed mid-answer ({e})") from e


def sse_text_deltas(lines) -> Iterator[str]:
    """The `choices[0].delta.content` pieces of an OpenAI chat stream, given its lines; stops at `data: [DONE]`.

    Server-sent events separate events by blank lines and put the payload after `data:`; other fields
    (`event:`, `id:`, comments starting with ':') carry nothing a chat needs.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise ChatError(f"the server reported an error mid-answer: {chunk['error']}")
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text


# ---------------------------------------------------------------------------------- the conversation

HELP = """commands:
  /help                 this list
  /reset                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (empty TEXT removes it) and reset
  /set NAME VALUE       change a setting: temperature, max_tokens, top_p, top_k, seed
  /settings             show the settings
  /controls             how often each --controls entry fired in this chat
  /quit                 leave (also Ctrl-D)"""


class ChatSession:
    """The conversation (system prompt + turns), the settings, and what each input line does."""

    def __init__(self, backend, system: str = "", settings: ChatSettings | None = None, out: TextIO | None = None):
        self.backend = backend
        self.system = system
        self.settings = settings or ChatSettings()
        self.out = out or sys.stdout
        self.history: list[dict] = []

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Act on one input line; False means the user asked to quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if command in ("quit", "exit"):
            return False
        if command == "help":
            self.say(HELP)
        elif command == "reset":
            self.history.clear()
            self.say("conversation reset")
        elif command == "system":
            self.system = arg
            self.history.clear()
            self.say(f"system prompt set to {arg!r}; conversation reset" if arg else "system prompt removed")
        elif command == "settings":
            self.say(", ".join(f"{f.name}={getattr(self.settings, f.name)}" for f in fields(self.settings)))
        elif command == "controls":
            if getattr(self.backend, "controls", None) is None:
                self.say("no --controls file is loaded here (a server applies its own --controls)")
            else:
                self.say(json.dumps(self.backend.control_counts, ensure_ascii=False))
        elif command == "set":
            name, _, value = arg.partition(" ")
            try:
                self.settings.set(name, value.strip())
                self.say(f"{name} = {getattr(self.settings, name)}")
            except ChatError as e:
                self.say(f"error: {e}")
        else:
            self.say(f"unknown command /{command}; /help lists the commands")
        return True

    def ask(self, text: str) -> None:
        """Send a user message and stream the answer; a failed answer leaves the history as it was."""
        self.history.append({"role": "user", "content": text})
        print("assistant> ", end="", file=self.out, flush=True)
        pieces = []
        try:
            for piece in self.backend.reply(self.messages, self.settings):
                pieces.append(piece)
                print(piece, end="", file=self.out, flush=True)
        except (ChatError, ValueError) as e:
            self.history.pop()
            self.say(f"\nerror: {e}")
            return
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; keep what arrived
            self.say(" [interrupted]")
        else:
            self.say("")
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})

    def run(self, lines: TextIO | None = None) -> None:
        """Read lines until /quit or end of input; a prompt is shown only when a person is typing."""
        lines = lines or sys.stdin
        interactive = lines.isatty()
        while True:
            if interactive:
                try:
                    line = input("you> ")
                except EOFError:
                    self.say("")
                    return
            else:
                line = lines.readline()
                if not line:
                    return
                self.say(f"you> {line.rstrip()}")
            if not self.handle(line):
                return


def chat_command(
    model: str | None = None,
    /,
    url: str | None = None,
    system: str = "",
    temperature: float = 0.7,
    max_tokens: int = 256,
    api_key: str | None = None,
    adapter: str | None = None,
    controls: str | None = None,
    quantize: Literal["int8", "int4"] | None = None,
) -> int:
    """Chat with a model in the terminal: answers stream as they are generated; /help lists the commands.

    Args:
        model: model folder to load in this process (or, with --url, the model id to ask the server for).
        url: base URL of a running `lmforge serve` (e.g. http://127.0.0.1:8000) to talk to instead.
        system: system prompt that starts the conversation.
        temperature: sampling temperature; 0 is greedy decoding.
        max_tokens: new tokens per answer at most.
        api_key: the server's API key (sent as a Bearer token), with --url.
        adapter: a LoRA adapter folder merged into the model on load (its saved chat template is used).
        controls: banned phrases and word logit biases for the local model (JSON or text file, see
            lmforge.infer.controls); /controls shows how often each fired. A server applies its own --controls.
        quantize: quantize the local model's weights on load: int8 (per-channel scales) or int4 (GGUF Q4_0's
            32-value blocks); a server applies its own --quantize.
    """
    if model is None and url is None:
        raise ChatError("give a model folder to chat with, or --url of a running `lmforge serve`")
    if url is not None and controls is not None:
        raise ChatError("--controls applies to a local model; start the server with `lmforge serve --controls FILE`")
    settings = ChatSettings()
    settings.set("temperature", str(temperature))
    settings.set("max_tokens", str(max_tokens))
    if url is not None and quantize is not None:
        raise ChatError("--quantize applies to a local model; start the server with `lmforge serve --quantize ...`")
    backend = RemoteBackend(url, api_key, model) if url else LocalBackend(model, adapter, controls, quantize)
    where = f"{backend.name} at {url}" if url else backend.name
    print(f"chatting with {where}; /help lists the commands, /quit leaves", flush=True)
    ChatSession(backend, system, settings).run()
    return 0
