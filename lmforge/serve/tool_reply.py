"""Tool calls in a chat answer: the `ChatShape` that turns an answer into OpenAI's `tool_calls`, whole or streamed.

Whole answers: the text is parsed when the choice closes (lmforge.serve.tools: the model's own call syntax for
"auto", the constrained JSON for "required" and a named function); calls go in `message.tool_calls`, the rest of
the text in `content` (null when there is none), and finish_reason becomes "tool_calls".

Streams follow OpenAI: a call's first delta carries its index, id, type and function name with empty arguments,
the next ones fragments of its arguments; the finish chunk says "tool_calls". A named function's answer is its
arguments, so each piece of text goes out as an arguments fragment as it is decoded. An "auto" answer streams as
content except text that may begin a call, which is held back (`ToolStream`) until the answer ends and turns out
to be calls or not; a "required" answer (a JSON array of calls) is sent as calls when it is complete. An answer
cut short (finish_reason "length") is never turned into calls: its text comes back as content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.serve.streaming import ChatShape
from lmforge.serve.tools import ToolCall, ToolFormat, ToolRequest


class ToolStream:
    """Streams an "auto" answer: text is passed on as it comes except what may begin a tool call, which is held
    until the answer ends; `finish` then says whether the held text was calls."""

    def __init__(self, request: ToolRequest, fmt: ToolFormat):
        self.request, self.format = request, fmt
        self.text = ""  # the whole answer so far
        self.sent = 0  # characters of it passed on as content
        self.holding = False  # a call may have begun at self.sent

    def feed(self, delta: str) -> str:
        """The content to send now for a new piece of the answer."""
        self.text += delta
        if self.holding:
            return ""
        pending = self.text[self.sent :]
        for start in self.format.starts:
            at = pending.find(start)
            if at >= 0 and (start != "{" or not pending[:at].strip()):  # Llama's "{" only opens an answer
                self.holding = True
                out, self.sent = pending[:at], self.sent + at
                return out
        keep = max(
            (
                k
                for start in self.format.starts
                for k in range(1, len(start))
                if pending.endswith(start[:k]) and (start != "{" or not pending[:-k].strip())
            ),
            default=0,
        )
        out = pending[: len(pending) - keep]
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, the calls): the held text's calls when it is valid calls
        (`ToolRequest.answer`), else no calls and the held text as content."""
        return self.request.answer(self.format, self.text[self.sent :])


def call_deltas(calls: list[ToolCall]) -> list[dict]:
    """OpenAI's streamed form of whole calls: per call, its id, type and name with empty arguments, then the
    arguments."""
    out = []
    for i, call in enumerate(calls):
        out.append({"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}})
        out.append({"index": i, "function": {"arguments": call.arguments}})
    return out


@dataclass
class _Choice:
    """One choice's state while it streams."""

    text: str = ""
    stream: ToolStream | None = None  # "auto"
    call: ToolCall | None = None  # a named function's call, once its first delta went out
    deltas: list[dict] = field(default_factory=list)


class ToolChatShape(ChatShape):
    """ChatShape for a request with tools (lmforge.serve.streaming's Reply drives it)."""

    def __init__(self, server, request: ToolRequest, fmt: ToolFormat):
        super().__init__(server)
        self.request, self.format = request, fmt
        self.states: dict[int, _Choice] = {}

    def calls(self, text: str, finish: str | None) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole answer."""
        if finish != "stop":  # cut short, or left without a way on: not a complete call
            return text, []
        if self.request.constrained:
            return "", self.request.constrained_calls(text)
        return self.request.answer(self.format, text)

    # ---- whole answers
    def close(self, choice: dict) -> None:
        message = choice["message"]
        content, calls = self.calls(message["content"], choice["finish_reason"])
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [c.as_openai() for c in calls]
            choice["finish_reason"] = "tool_calls"

    # ---- streams
    def chunks(self, index: int, text: str, lp: dict | None, finish: str | None) -> list[list[dict]]:
        state = self.states.setdefault(index, _Choice())
        state.text += text
        out: list[list[dict]] = []
        delta: dict = {}
        if self.request.forced is not None:  # the text is the arguments: each piece is a fragment
            if state.call is None:
                state.call = ToolCall(self.request.forced.name, "")
                out.append(
                    [
                        {
                            "index": index,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "index": 0,
                                        "id": state.call.id,
                                        "type": "function",
                                        "function": {"name": state.call.name, "arguments": ""},
                                    }
                                ]
                            },
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            if text:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        elif self.request.constrained:  # "required": the JSON array is sent as calls when complete
            pass
        else:
            if state.stream is None:
                state.stream = ToolStream(self.request, self.format)
            content = state.stream.feed(text)
            delta = {"content": content} if content else {}
        if delta or lp:
            out.append([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}])
        if finish:
            out += self._finish(index, state, finish)
        return out

    def _finish(self, index: int, state: _Choice, finish: str) -> list[list[dict]]:
        def chunk(delta: dict, reason=None) -> list[dict]:
            return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]

        if self.request.forced is not None:
            return [chunk({}, "tool_calls" if finish == "stop" else finish)]
        if self.request.constrained:
            content, calls = self.calls(state.text, finish)
        else:
            content, calls = state.stream.finish() if finish == "stop" else (state.text[state.stream.sent :], [])
        out = [chunk({"content": content})] if content else []
        if calls:
            out.append(chunk({"tool_calls": call_deltas(calls)}))
        return out + [chunk({}, "tool_calls" if calls else finish)]
