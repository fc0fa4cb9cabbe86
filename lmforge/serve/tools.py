"""Tool calling: the tools of a chat request, how the model's answer becomes `tool_calls`, and what constrains it.

OpenAI's chat API gives a request `tools` (functions with a JSON-schema `parameters`), `tool_choice` ("none",
"auto", "required" or {"type": "function", "function": {"name": ...}}) and `parallel_tool_calls`; an assistant
message may carry `tool_calls` and a "tool" message answers one by `tool_call_id`.

- The tools reach the model through its chat template (`tools=`, as Hugging Face templates take them; lmforge's
  default templates write them in lmforge's tool format, lmforge.templates). With "none" the model is not told
  about them. A template that has no place for tools cannot honour them: the request is refused, not the tools
  dropped.
- "auto": the answer is parsed in the tool-call syntax of the model's family (`ToolFormat`, chosen by what its
  template writes): Hermes/Qwen `<tool_call>{"name", "arguments"}</tool_call>` (also lmforge's own), Llama 3's
  bare JSON `{"name", "parameters"}` (after `<|python_tag|>` or not, several joined by ";"), Mistral's
  `[TOOL_CALLS][{"name", "arguments"}, ...]`. An answer whose calls all name a given tool with arguments that
  validate against its schema becomes `tool_calls` (finish_reason "tool_calls"); anything else is text.
- "required" and a named function are decoded under a constraint (lmforge.serve.structured): a named function's
  answer is its arguments, a JSON value of its `parameters` schema; "required" answers a JSON array of
  {"name", "arguments"} objects, one per call (exactly one unless parallel_tool_calls), each arguments object of
  its own function's schema. So the arguments always parse and validate.

lmforge.serve.tool_reply turns answers into OpenAI's `tool_calls`, whole or streamed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

import jsonschema

from lmforge.errors import LmforgeError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolError(LmforgeError):
    """Tools, a tool_choice or tool messages a request cannot have; the message names the field."""


@dataclass
class Tool:
    name: str
    parameters: dict  # a JSON schema (an object schema by OpenAI's convention)
    given: dict  # the tool as the request gave it, which chat templates take as it is


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolRequest:
    """What a request asks of tools: the tools, the choice ("none", "auto", "required" or a function's name) and
    whether several calls may come in one answer."""

    tools: list[Tool]
    choice: str
    parallel: bool = True

    @property
    def forced(self) -> Tool | None:
        """The named function a `tool_choice` of {"type": "function", ...} asks for."""
        return (
            next((t for t in self.tools if t.name == self.choice), None)
            if self.choice not in ("none", "auto", "required")
            else None
        )

    @property
    def constrained(self) -> bool:
        return self.choice == "required" or self.forced is not None

    @property
    def template_tools(self) -> list[dict] | None:
        """The tools to give the chat template (None with tool_choice "none": the model is not told of them)."""
        return None if self.choice == "none" else [t.given for t in self.tools]

    def schema(self) -> dict:
        """The JSON schema a constrained answer follows (see the module docstring)."""
        if self.forced is not None:
            return self.forced.parameters
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {"type": "array", "items": items, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}

    def constrained_calls(self, text: str) -> list[ToolCall]:
        """The calls of an answer decoded under `schema()` (ToolError if it was cut short before it closed)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ToolError(
                f"the tool call was cut off before it was complete ({e}); raise max_tokens", param="max_tokens"
            ) from None
        if self.forced is not None:
            return [ToolCall(self.forced.name, json.dumps(value, ensure_ascii=False))]
        return [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in value]

    def answer(self, fmt: ToolFormat, text: str) -> tuple[str, list[ToolCall]]:
        """An "auto" answer as (content, calls): its calls when it has some and every one is valid (and there is
        one, unless parallel calls are allowed), else the whole text as content and no calls."""
        content, calls = fmt.parse(text)
        if calls and all(self.valid(c) for c in calls) and (self.parallel or len(calls) == 1):
            return content, calls
        return text, []

    def valid(self, call: ToolCall) -> bool:
        """Whether a parsed call names one of the tools and its arguments validate against that tool's schema."""
        tool = next((t for t in self.tools if t.name == call.name), None)
        if tool is None:
            return False
        try:
            jsonschema.validate(json.loads(call.arguments), tool.parameters)
        except (json.JSONDecodeError, jsonschema.ValidationError, jsonschema.SchemaError):
            return False
        return True


def tool_request(tools: list[dict] | None, tool_choice, parallel_tool_calls: bool | None) -> ToolRequest | None:
    """Check a request's tool fields (plain JSON values) into a ToolRequest; None when it has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError(
                "tool_choice is given but tools is empty: give the tools the model may call", param="tool_choice"
            )
        return None
    parsed: list[Tool] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(
                f'tools[{i}] must be {{"type": "function", "function": {{...}}}}; lmforge serves function tools only',
                param=f"tools[{i}]",
            )
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(
                f"tools[{i}].function.name={name!r} must be 1-64 letters, digits, '_' or '-'",
                param=f"tools[{i}].function.name",
            )
        if any(p.name == name for p in parsed):
            raise ToolError(f"two tools are named {name!r}; names must be unique", param=f"tools[{i}].function.name")
        params = fn.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise ToolError(
                f"tools[{i}].function.parameters must be a JSON schema object", param=f"tools[{i}].function.parameters"
            )
        try:
            jsonschema.Draft202012Validator.check_schema(params)
        except jsonschema.SchemaError as e:
            raise ToolError(
                f"tools[{i}].function.parameters is not a valid JSON schema: {e.message}",
                param=f"tools[{i}].function.parameters",
            ) from None
        parsed.append(Tool(name, params, {"type": "function", **t}))
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name is None:
            raise ToolError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        if all(t.name != name for t in parsed):
            raise ToolError(
                f"tool_choice names the function {name!r}, which is not among the tools "
                f"({', '.join(t.name for t in parsed)})",
                param="tool_choice",
            )
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise ToolError(
            f'tool_choice={choice!r} must be "none", "auto", "required" or a named function', param="tool_choice"
        )
    return ToolRequest(parsed, choice, True if parallel_tool_calls is None else bool(parallel_tool_calls))


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: a tool call's `arguments` as an object (OpenAI sends a JSON
    string; Hugging Face templates write `arguments | tojson`), content "" rather than null. A "tool" message must
    answer a call an earlier assistant message made (its `tool_call_id`), as OpenAI requires."""
    out: list[dict] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None}
        m.setdefault("content", "")
        if m["role"] == "tool" and m.get("tool_call_id") not in call_ids:
            raise ToolError(
                f"messages[{i}] is a tool message answering tool_call_id={m.get('tool_call_id')!r}, "
                f"which no earlier assistant message called",
                param=f"messages[{i}].tool_call_id",
            )
        call_ids |= {c.get("id") for c in m.get("tool_calls") or []}
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = dict(call.get("function") or {})
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise ToolError(
                            f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {args!r}",
                            param=f"messages[{i}].tool_calls[{j}].function.arguments",
                        ) from None
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


# ---------------------------------------------------------------------------------------------- formats


@dataclass
class ToolFormat:
    """How one family of models writes tool calls: `parse` splits an answer into text and calls; `starts` are
    the texts a call begins with (streaming holds them back)."""

    name: str
    starts: tuple[str, ...]

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(text outside the calls, the calls); no calls when the answer holds none or one does not parse."""
        try:
            if self.name in ("hermes", "lmforge"):
                return _parse_hermes(text)
            if self.name == "mistral":
                return _parse_mistral(text)
            return _parse_llama3(text)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return text, []


FORMATS = {
    "hermes": ToolFormat("hermes", ("<tool_call>",)),
    "llama3": ToolFormat("llama3", ("<|python_tag|>", "{")),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]",)),
    "lmforge": ToolFormat("lmforge", ("<tool_call>",)),
}


def tool_format(template_source: str, lmforge_default: bool) -> ToolFormat:
    """The format a model's answers use, read from what its chat template writes (lmforge's default templates:
    lmforge's own). ToolError when the template has no place for tools."""
    if lmforge_default:
        return FORMATS["lmforge"]
    if "tools" not in template_source:
        raise ToolError(
            "this model's chat template does not show tools to the model (it never reads `tools`), "
            "so tool calls cannot be honoured; serve a model whose template supports tools",
            param="tools",
        )
    if "[TOOL_CALLS]" in template_source:
        return FORMATS["mistral"]
    if "<tool_call>" in template_source:
        return FORMATS["hermes"]
    return FORMATS["llama3"]  # Llama 3.1+ write the tools as JSON and expect {"name", "parameters"} back


def _call(obj: dict) -> ToolCall:
    args = obj["arguments"] if "arguments" in obj else obj["parameters"]
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(obj["name"], str) or not isinstance(args, dict):
        raise ValueError("a call needs a name and an arguments object")
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    pieces = re.split(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
    calls = [_call(json.loads(body)) for body in pieces[1::2]]
    return "".join(pieces[0::2]).strip(), calls


def _parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        obj, i = decoder.raw_decode(body, i)
        calls.append(_call(obj))
        rest = body[i:].lstrip()
        if rest and not rest.startswith(";"):
            raise ValueError("text after a call")
        i = len(body) - len(rest.removeprefix(";").lstrip())
    return "", calls


def _parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    head, marker, body = text.partition("[TOOL_CALLS]")
    if not marker:
        return text, []
    value, _ = json.JSONDecoder().raw_decode(body.strip())
    return head.strip(), [_call(c) for c in (value if isinstance(value, list) else [value])]
