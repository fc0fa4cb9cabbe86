"""What applications build on, driven through a running `lmforge serve` by the official `openai` package (and raw
HTTP where the package has no call): tool calling, /v1/embeddings and many LoRA adapters on one server.

The model is tiny and random (a deliberately poor one: constrained tool calls must still always parse and
validate); references are independent: jsonschema for arguments, transformers' `apply_chat_template` for the
prompt a tool conversation renders to, the Python embedding function, the model with each adapter merged.
"""

import base64
import json
import threading

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from lmforge import lora
from lmforge.apps.embed import embed_texts
from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.peft import save_adapter
from lmforge.loader import load
from lmforge.model import Transformer
from lmforge.serve.process import start_server, stop_server
from lmforge.serve.tools import template_messages
from lmforge.templates import ChatTemplate
from lmforge.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ['the cat sat on the mat. {"city": "paris", "unit": "c", "days": 3}\n'] * 50 + [
    "hello world, what is the weather like today?\n"
] * 50
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def model_folder(path, seed=0):
    tok = train_tokenizer("bpe", CORPUS, 300)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=1536, n_layer=2, n_head=2, n_embd=32))
    save_model(path, model, tok)
    return model, tok


def adapter_folder(path, base_folder, seed):
    model = load(base_folder, prepare=False).model
    digest = lora.base_digest(model)
    lora.add_lora(model, rank=4, alpha=8, targets=["attn.qkv", "mlp.fc", "mlp.proj"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    save_adapter(path, model, base=str(base_folder), digest=digest)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    model, tok = model_folder(root / "base")
    adapters = {name: adapter_folder(root / name, root / "base", seed) for name, seed in (("alpha", 1), ("beta", 2))}
    proc, url = start_server(
        str(root / "base"),
        "--log-level",
        "warning",
        "--max-batch",
        "8",
        "--api-key",
        "k",
        "--lora",
        *(f"{n}={p}" for n, p in adapters.items()),
        "--speculative",
        "ngram",
        timeout=120,
    )
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    yield client, url, root, tok
    assert stop_server(proc) in (0, -15)


def check_calls(message, finish_reason, names, parallel):
    """The calls of an answer: each names one of `names` and its arguments parse and validate."""
    assert finish_reason == "tool_calls", (finish_reason, message)
    calls = message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


# ---------------------------------------------------------------------------------------------- tool calling


def test_required_and_named_tool_calls_always_parse_and_validate(served):
    client = served[0]
    messages = [{"role": "user", "content": "what is the weather like today?"}]
    for seed in range(12):  # a random model, sampled: only the constraint keeps the calls valid
        r = client.chat.completions.create(
            model="base",
            messages=messages,
            tools=[WEATHER, TIME],
            seed=seed,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            max_tokens=120,
        )
        check_calls(r.choices[0].message, r.choices[0].finish_reason, {"get_weather", "get_time"}, parallel=False)
        r = client.chat.completions.create(
            model="base",
            messages=messages,
            tools=[WEATHER, TIME],
            seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=1.0,
            max_tokens=120,
        )
        [call] = check_calls(r.choices[0].message, r.choices[0].finish_reason, {"get_time"}, parallel=False)
        assert r.choices[0].message.content is None
    r = client.chat.completions.create(
        model="base",
        messages=messages,
        tools=[WEATHER, TIME],
        seed=3,
        n=3,
        tool_choice="required",
        temperature=1.0,
        max_tokens=300,
    )
    for choice in r.choices:  # parallel calls allowed: one or more, each valid
        check_calls(choice.message, choice.finish_reason, {"get_weather", "get_time"}, parallel=True)


def stream_calls(stream):
    """Accumulate a streamed answer's tool-call deltas as OpenAI's clients do; (calls, content, finish)."""
    calls, content, finish = {}, "", None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function is not None:
                    call["name"] = d.function.name or call["name"]
                    call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


def test_streamed_tool_calls_arrive_as_openai_deltas_and_validate(served):
    client = served[0]
    messages = [{"role": "user", "content": "weather?"}]
    for seed, choice in [
        (0, "required"),
        (1, {"type": "function", "function": {"name": "get_weather"}}),
        (2, "required"),
    ]:
        stream = client.chat.completions.create(
            model="alpha",
            messages=messages,
            tools=[WEATHER, TIME],
            seed=seed,
            tool_choice=choice,
            temperature=1.0,
            max_tokens=200,
            stream=True,
        )
        calls, content, finish = stream_calls(stream)
        assert finish == "tool_calls" and calls and content == ""
        for call in calls:
            assert call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_auto_answers_text_or_well_formed_calls(served):
    client = served[0]
    for seed in range(6):
        r = client.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": "hello"}],
            tools=[WEATHER],
            tool_choice="auto",
            seed=seed,
            temperature=1.0,
            max_tokens=30,
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message, choice.finish_reason, {"get_weather"}, parallel=True)
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
        stream = client.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": "hello"}],
            tools=[WEATHER],
            seed=seed,
            temperature=1.0,
            max_tokens=30,
            stream=True,
        )
        calls, content, finish = stream_calls(stream)
        # The stream is the same answer (seeded): its content and calls are the whole answer's.
        assert (content or None) == choice.message.content and len(calls) == len(choice.message.tool_calls or [])


def test_a_conversation_with_tool_results_goes_on_and_tool_requests_that_cannot_be_honoured_are_400s(served):
    client = served[0]
    history = [
        {"role": "user", "content": "weather in paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    r = client.chat.completions.create(model="beta", messages=history, tools=[WEATHER], max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bad = [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="required", stop=["x"]), "stop"),
        (dict(functions=[WEATHER["function"]]), "functions"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
            "tools[0].function.parameters",
        ),
    ]
    for extra, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5, **extra
            )
        assert e.value.body["param"] == param, (extra, e.value.body)
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=orphan, max_tokens=5)
    assert e.value.body["param"] == "messages[1].tool_call_id"


# Qwen2.5-Instruct's chat template (its tokenizer_config.json), which takes tools and tool messages.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are '
    'provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

OPENAI_CONVERSATION = [
    {"role": "system", "content": "You answer briefly. Ünïcode stays as it is."},
    {"role": "user", "content": "weather in paris and the time in CET?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "paris", "unit": "c"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "cet"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, <sunny>"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    {"role": "user", "content": "and tomorrow?"},
]


def test_a_tool_conversation_renders_through_a_hugging_face_template_as_transformers_renders_it(tmp_path):
    model, tok = model_folder(tmp_path / "qwen")
    (tmp_path / "qwen" / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN25_TEMPLATE}))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "qwen" / "tokenizer.json"))
    hf_messages = [
        dict(
            m,
            tool_calls=[
                dict(c, function=dict(c["function"], arguments=json.loads(c["function"]["arguments"])))
                for c in m["tool_calls"]
            ],
        )
        if "tool_calls" in m
        else m
        for m in OPENAI_CONVERSATION
    ]  # arguments as objects, as transformers' docs ask
    expected = hf.apply_chat_template(
        hf_messages, tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True, chat_template=QWEN25_TEMPLATE
    )
    ours = ChatTemplate.for_model(tmp_path / "qwen", tok)
    assert ours.render(template_messages(OPENAI_CONVERSATION), [WEATHER, TIME]) == expected
    assert "<tool_response>\n18 degrees, <sunny>\n</tool_response>" in expected  # the template did use them

    # The server renders the same prompt: its usage counts exactly the tokens of transformers' text.
    proc, url = start_server(str(tmp_path / "qwen"), "--log-level", "warning", timeout=120)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="qwen", messages=OPENAI_CONVERSATION, tools=[WEATHER, TIME], max_tokens=3, temperature=0
        )
        assert r.usage.prompt_tokens == len(tok.encode(expected))
        plain = tmp_path / "plain"
        model_folder(plain)
        (plain / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"})
        )
    finally:
        stop_server(proc)
    proc, url = start_server(str(plain), "--log-level", "warning", timeout=120)
    try:  # a template with no place for tools: the request is refused, the tools never silently dropped
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "plain", "tools": [WEATHER], "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert "does not show tools" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(plain)}, timeout=30)
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]  # no key: no admin
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------------------------- embeddings


def test_embeddings_over_http_equal_the_python_function_float_and_base64(served):
    client, url, root, tok = served
    local = load(root / "base")
    texts = ["the cat sat on the mat.", "hello world", "what is the weather like today? " * 3]
    expected = embed_texts(local.model, local.tokenizer, texts)
    r = client.embeddings.create(model="base", input=texts, encoding_format="float")
    got = torch.tensor([d.embedding for d in r.data])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(t)) for t in texts)
    raw = httpx.post(
        url + "/v1/embeddings",
        headers={"Authorization": "Bearer k"},
        timeout=60,
        json={"model": "base", "input": texts, "encoding_format": "base64"},
    ).json()
    decoded = torch.tensor(
        np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    )
    torch.testing.assert_close(decoded, got, atol=0, rtol=0)  # the same float32 bits


def test_embedding_inputs_as_token_ids_dimensions_and_errors(served):
    client, url, root, tok = served
    ids = [tok.encode("hello world"), tok.encode("the cat")]
    by_ids = client.embeddings.create(model="base", input=ids, encoding_format="float")
    by_text = client.embeddings.create(model="base", input=["hello world", "the cat"], encoding_format="float")
    vectors = torch.tensor([d.embedding for d in by_text.data])
    torch.testing.assert_close(torch.tensor([d.embedding for d in by_ids.data]), vectors, atol=1e-6, rtol=1e-5)
    one = client.embeddings.create(model="base", input=ids[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), vectors[0], atol=1e-6, rtol=1e-5)
    short = client.embeddings.create(model="base", input="hello world", dimensions=8, encoding_format="float")
    v = torch.tensor(by_text.data[0].embedding[:8])
    torch.testing.assert_close(torch.tensor(short.data[0].embedding), v / v.norm(), atol=1e-6, rtol=1e-5)
    adapted = client.embeddings.create(model="alpha", input="hello world", encoding_format="float")
    assert (torch.tensor(adapted.data[0].embedding) - vectors[0]).abs().max() > 1e-3  # the adapter's model
    for kwargs, param in [
        (dict(input=""), "input[0]"),
        (dict(input=[]), "input"),
        (dict(input=[[5, 10**6]]), "input[0]"),
        (dict(input="x", dimensions=33), "dimensions"),
        (dict(input="x" * 3000), "input[0]"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="base", encoding_format="float", **kwargs)
        assert e.value.body["param"] == param


# ---------------------------------------------------------------------------------------------- adapters


def test_requests_for_different_adapters_run_together_and_each_answers_as_its_merged_model(served):
    client, url, root, tok = served
    assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == [
        ("base", None),
        ("alpha", "base"),
        ("beta", "base"),
    ]
    prompt = "the cat sat on"
    params = SamplingParams(max_tokens=12, temperature=0)
    expected = {}
    for name in ("base", "alpha", "beta"):
        model = load(root / "base", adapter=None if name == "base" else root / name).model
        expected[name] = generate(model, [tok.encode(prompt)], params, tokenizer=tok, eos_id=tok.eos_id)[0].text
    assert len(set(expected.values())) == 3  # the adapters change the answer
    got = {}

    def ask(name):
        got[name] = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(name,)) for name in ["alpha", "base", "beta"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "beta" and chat.choices[0].message.content is not None


def test_adapters_load_and_unload_at_run_time_behind_the_api_key(served):
    client, url, root, tok = served
    auth = {"Authorization": "Bearer k"}
    gamma = adapter_folder(root / "gamma", root / "base", 3)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(gamma)}, timeout=60)
    assert r.status_code == 401  # no key: the edge refuses it
    r = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(gamma)}, headers=auth, timeout=60
    )
    assert r.status_code == 200, r.text
    merged = load(root / "base", adapter=gamma).model
    expected = generate(
        merged, [tok.encode("hello")], SamplingParams(max_tokens=8, temperature=0), tokenizer=tok, eos_id=tok.eos_id
    )[0].text
    assert (
        client.completions.create(
            model="gamma",
            prompt="hello",
            max_tokens=8,
            temperature=0,
        )
        .choices[0]
        .text
        == expected
    )
    assert "gamma" in [m.id for m in client.models.list().data]
    r = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(gamma)}, headers=auth, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(
        url + "/v1/load_lora_adapter",
        json={"lora_name": "delta", "lora_path": str(root / "nope")},
        headers=auth,
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=auth, timeout=60)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="hello", max_tokens=2)
