"""Tool calling's pieces (lmforge.serve.tools): checking the request's tools, parsing each family's call syntax,
streaming an answer that may turn into calls."""

import json

import pytest

from lmforge.serve.tool_reply import ToolStream
from lmforge.serve.tools import FORMATS, ToolError, template_messages, tool_format, tool_request

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_tool_fields_are_checked_and_errors_name_the_field():
    req = tool_request([WEATHER, TIME], None, None)
    assert req.choice == "auto" and req.parallel and [t.name for t in req.tools] == ["get_weather", "get_time"]
    assert (
        tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False).forced.name
        == "get_weather"
    )
    assert tool_request(None, None, None) is None and tool_request([], "none", None) is None
    cases = [
        (([], "required", None), "tool_choice", "tools is empty"),
        (([WEATHER, WEATHER], None, None), "tools[1].function.name", "unique"),
        (([{"type": "code_interpreter"}], None, None), "tools[0]", "function tools only"),
        (([{"type": "function", "function": {"name": "a b"}}], None, None), "tools[0].function.name", "letters"),
        (
            ([{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}], None, None),
            "tools[0].function.parameters",
            "not a valid JSON schema",
        ),
        (([WEATHER], {"type": "function", "function": {"name": "nope"}}, None), "tool_choice", "not among"),
        (([WEATHER], "sometimes", None), "tool_choice", "must be"),
    ]
    for args, param, message in cases:
        with pytest.raises(ToolError, match=message) as e:
            tool_request(*args)
        assert e.value.param == param


def test_each_familys_call_syntax_parses_into_calls():
    req = tool_request([WEATHER, TIME], "auto", True)
    answers = {
        "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}}',
        "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}}]',
    }
    for name, text in answers.items():
        content, calls = req.answer(FORMATS[name], text)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"}),
            ("get_time", {}),
        ], name
        assert content == ("Let me check." if name == "hermes" else "")
        assert len({c.id for c in calls}) == 2 and calls[0].id.startswith("call_")


def test_an_answer_with_an_unknown_tool_bad_json_or_invalid_arguments_stays_text():
    req = tool_request([WEATHER], "auto", False)
    for text in [
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": 3}}\n</tool_call>',  # city: a string
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a"\n</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "a"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "b"}}</tool_call>',  # two: not parallel
        "It is sunny in Paris.",
    ]:
        assert req.answer(FORMATS["hermes"], text) == (text, [])


def test_the_template_decides_the_format_and_a_template_without_tools_is_refused():
    assert tool_format("... {{- '<tool_call>' }} ... tools ...", False).name == "hermes"
    assert tool_format("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", False).name == "mistral"
    assert tool_format("{%- if tools is not none %}Given the following functions{% endif %}", False).name == "llama3"
    assert tool_format("anything", True).name == "lmforge"
    with pytest.raises(ToolError, match="does not show tools to the model"):
        tool_format("{% for m in messages %}{{ m.content }}{% endfor %}", False)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', "Sure. ", 1),
        ("a < b and <tool but not a call", "a < b and <tool but not a call", 0),
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": ',
            '<tool_call>{"name": "get_weather", "arguments": {"city": ',
            0,
        ),  # cut off: text
    ],
)
def test_streaming_holds_back_only_what_may_begin_a_call(text, content, calls):
    req = tool_request([WEATHER], "auto", True)
    stream = ToolStream(req, FORMATS["hermes"])
    sent = "".join(stream.feed(ch) for ch in text)  # one character at a time: the hardest split
    rest, got = stream.finish()
    assert sent + rest == content and len(got) == calls
    if calls:
        assert sent == "Sure. " and rest == ""  # the text before the call went out as it came


def test_openai_tool_messages_become_what_templates_expect():
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    out = template_messages(messages)
    assert out[1]["content"] == "" and out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[2] == messages[2]
    with pytest.raises(ToolError) as e:
        template_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


def test_an_auto_answer_with_a_call_streams_content_then_call_deltas_then_tool_calls_and_closes_the_same():
    from lmforge.serve.tool_reply import ToolChatShape

    req = tool_request([WEATHER], "auto", True)
    answer = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>'
    pieces = [answer[i : i + 7] for i in range(0, len(answer), 7)]
    shape = ToolChatShape(None, req, FORMATS["hermes"])
    chunks = [
        c for i, p in enumerate(pieces) for c in shape.chunks(0, p, None, "stop" if i == len(pieces) - 1 else None)
    ]
    deltas = [c[0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Checking. "
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    assert [c[0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    choice = {"message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
    ToolChatShape(None, req, FORMATS["hermes"]).close(choice)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    cut = {"message": {"role": "assistant", "content": answer}, "finish_reason": "length"}
    ToolChatShape(None, req, FORMATS["hermes"]).close(cut)  # cut short: never calls
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut["message"]
