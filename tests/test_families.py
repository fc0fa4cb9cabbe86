"""Every imported family against transformers itself, through every path lmforge runs.

Each family is one row of FAMILIES: a tiny random model built with transformers' own config class, with what makes
the family differ switched on where a short test can see it (sliding windows shorter than the prompts, RoPE scaling
whose original context is shorter than the positions used, soft-caps the scores and logits exceed), a byte-level
BPE tokenizer with the family's special tokens, a chat template in the family's style and a generation_config.json
with several EOS ids. The references are transformers' forward, its cached decoding and `generate`, its
`apply_chat_template` and `from_pretrained`; lmforge's side goes through import, the fused decode step, the
continuous-batching engine, `serve` over HTTP and export.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.apps.convert import export_command, import_command  # noqa: E402
from lmforge.infer.fused import decode_path, prepare_for_decoding, unsupported_reason  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.interop.gguf import LLAMA3_SPLIT, QWEN2_SPLIT  # noqa: E402
from lmforge.interop.hf import UnsupportedModelError, config_from_hf, export_hf, import_hf  # noqa: E402
from lmforge.loader import read  # noqa: E402
from lmforge.templates import ChatTemplate  # noqa: E402

VOCAB = 300
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "hello there, how are you today? ",
    "a small model talks in tokens: 1, 2, 3. ",
] * 30

# ---- chat templates in each family's style (written for these tests: system turns, alternation checks, trims,
# strftime_now, namespaces, bos/eos tokens, roles renamed), rendered by both sides.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if strftime_now is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- else %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
CHATML = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3 = """{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in message.content %}
        {{- message.content.split('</think>')[-1].lstrip('\\n') }}
    {%- else %}
        {{- message.content }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""
MISTRAL = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + '[/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""
PHI3 = """{%- for message in messages %}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\\n' }}
{%- else %}
    {{- eos_token }}
{%- endif %}
"""
GEMMA2 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}
"""
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""
OLMO2 = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{{- '<|system|>\\n' + message['content'] + '\\n' }}
    {%- elif message['role'] == 'user' %}{{- '<|user|>\\n' + message['content'] + '\\n' }}
    {%- else %}{{- '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{%- endif %}
    {%- if loop.last and add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}
{%- endfor %}
"""


@dataclass
class Family:
    config: str  # transformers config class
    model: str  # transformers model class
    settings: dict  # the family-specific features, switched on
    template: str
    specials: list[str]  # special tokens; the first two are bos and eos
    ends: list[str]  # generation_config.json's eos_token_id, by token
    off: dict = field(default_factory=dict)  # the same model with its features switched off (they must matter)
    system: bool = True  # the template takes a system turn
    norm_init: tuple = (0.5, 1.5)  # norm weights drawn from this range (Gemma stores w - 1: around 0)
    split: str | None = None  # the tokenizer's pre-tokenizer regex (Llama 3's, Qwen2's); None: GPT-2's ByteLevel


LONG_ROPE = dict(
    type="longrope", short_factor=[1.0 + i / 10 for i in range(6)], long_factor=[2.0 + i for i in range(6)]
)
FAMILIES = {
    # Llama 3.2: llama3 RoPE scaling from an original context of 16, tied embeddings, several EOS ids.
    "llama3": Family(
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        LLAMA3,
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
        ],
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        off=dict(rope_scaling=None),
        split=LLAMA3_SPLIT,
    ),
    # SmolLM2: a tied Llama with ChatML and its own RoPE base.
    "smollm2": Family(
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=True, rope_theta=100000.0),
        CHATML,
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        ["<|im_end|>"],
    ),
    # Qwen2.5: q/k/v biases, a sliding window on the layers from max_window_layers on, YaRN scaling.
    "qwen2": Family(
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=True,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
        ),
        CHATML,
        ["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
        ["<|im_end|>", "<|endoftext|>"],
        off=dict(use_sliding_window=False, rope_scaling=None),
        split=QWEN2_SPLIT,
    ),
    # Qwen3: per-head RMSNorm on q and k, heads wider than hidden_size / heads.
    "qwen3": Family(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=24, tie_word_embeddings=True),
        QWEN3,
        ["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
        ["<|im_end|>", "<|endoftext|>"],
        split=QWEN2_SPLIT,
    ),
    # Mistral: every layer attends through a window of 8.
    "mistral": Family(
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=8),
        MISTRAL,
        ["<s>", "</s>", "[INST]", "[/INST]"],
        ["</s>"],
        off=dict(sliding_window=None),
        system=False,
    ),
    # Phi-4-mini: fused qkv_proj and gate_up_proj, LongRoPE past an original context of 16, partial rotary (3/4),
    # and Phi-3-mini's sliding window.
    "phi3": Family(
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            sliding_window=8,
            rope_scaling=LONG_ROPE,
            original_max_position_embeddings=16,
            partial_rotary_factor=0.75,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        PHI3,
        ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
        ["<|end|>", "<|endoftext|>"],
        off=dict(sliding_window=None, rope_scaling=None),
    ),
    # Gemma 2: sandwich norms (stored w - 1), GeGLU, scaled embeddings, query_pre_attn_scalar, soft-caps that bite,
    # a window on alternate layers.
    "gemma2": Family(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=24,
            sliding_window=8,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
        ),
        GEMMA2,
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        ["<eos>", "<end_of_turn>"],
        off=dict(sliding_window=128, attn_logit_softcapping=None, final_logit_softcapping=None),
        system=False,
        norm_init=(-0.5, 0.5),
    ),
    # Gemma 3 (text): per-head q/k norms, local layers with their own RoPE base, linear scaling on global ones.
    "gemma3": Family(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=24,
            sliding_window=8,
            sliding_window_pattern=2,
            rope_local_base_freq=100.0,
            rope_scaling=dict(rope_type="linear", factor=4.0),
            final_logit_softcapping=3.0,
        ),
        GEMMA3,
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        ["<eos>", "<end_of_turn>"],
        off=dict(sliding_window=128, rope_scaling=None, final_logit_softcapping=None),
        norm_init=(-0.5, 0.5),
    ),
    # OLMo 2: norms on the sublayer outputs only, RMSNorm over the whole q and k projections.
    "olmo2": Family(
        "Olmo2Config",
        "Olmo2ForCausalLM",
        dict(),
        OLMO2,
        ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"],
        ["<|endoftext|>"],
    ),
}
NAMES = list(FAMILIES)
TOKENS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))  # longer than every window
PROMPTS = [TOKENS[0, :11].tolist(), TOKENS[1, :5].tolist(), TOKENS[1, 7:20].tolist()]
NEW_TOKENS = 14  # prompts + new tokens run past the windows and the original contexts


# ------------------------------------------------------------------------------------------ building the models


def load_any(folder):
    """(model, tokenizer) of an lmforge or Hugging Face folder, as stored (lmforge.loader.read)."""
    loaded = read(folder)
    return loaded.model, loaded.tokenizer


def hf_model(family: Family, settings: dict | None = None, seed: int = 0):
    """The family's transformers model with random weights large enough that norms, caps and windows show."""
    config = getattr(transformers, family.config)(**(SMALL | (family.settings if settings is None else settings)))
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(*family.norm_init)
            else:
                p.normal_(0.0, 0.15)
    return model


def tokenizer_for(family: Family):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if family.split is not None:  # as Llama 3's and Qwen2's tokenizer.json: a regex split, then bytes
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 20,
        special_tokens=family.specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.specials[0], eos_token=family.specials[1], chat_template=family.template
    )


@dataclass
class Built:
    family: Family
    hf: object  # transformers model
    hf_tok: object
    hf_folder: Path
    folder: Path  # the lmforge import
    ends: list[int]  # generation_config.json's eos ids


_built: dict[str, Built] = {}


@pytest.fixture(params=NAMES)
def built(request, tmp_path_factory) -> Built:
    name = request.param
    if name not in _built:
        family = FAMILIES[name]
        root = tmp_path_factory.mktemp(name)
        hf, hf_tok = hf_model(family), tokenizer_for(family)
        ends = [hf_tok.convert_tokens_to_ids(t) for t in family.ends]
        hf.generation_config = transformers.GenerationConfig(
            bos_token_id=hf_tok.bos_token_id, eos_token_id=ends, pad_token_id=hf_tok.eos_token_id
        )
        hf.save_pretrained(root / "hf", max_shard_size="150KB")  # sharded, as large checkpoints are
        hf_tok.save_pretrained(root / "hf")
        assert (root / "hf" / "model.safetensors.index.json").is_file()
        import_command(str(root / "hf"), str(root / "ours"))
        _built[name] = Built(family, hf, hf_tok, root / "hf", root / "ours", ends)
    return _built[name]


def hf_logits(model, tokens, stepwise_from: int | None = None) -> torch.Tensor:
    """transformers' logits for tokens (B, T): one call, or a prefill then one token per call (its generation)."""
    with torch.no_grad():
        if stepwise_from is None:
            return model(tokens).logits
        cache = transformers.DynamicCache(config=model.config)
        out = [model(tokens[:, :stepwise_from], cache=cache, use_cache=True).logits]
        for t in range(stepwise_from, tokens.shape[1]):
            out.append(model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits)
        return torch.cat(out, 1)


def hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS, eos: list[int] | None = None) -> list[int]:
    """transformers.generate's greedy tokens for one prompt (one row: its LongRoPE looks at the batch's longest)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


# ------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", NAMES)
def test_family_features_change_transformers_logits(name):
    """The reference really exercises each family's features: switched off, transformers' own logits move."""
    family = FAMILIES[name]
    if not family.off:
        pytest.skip(f"{name}'s features (biases, norms) are in its weights and layout, not switches")
    on, off = hf_model(family), hf_model(family, family.settings | family.off)
    assert (hf_logits(on, TOKENS) - hf_logits(off, TOKENS)).abs().max() > 1e-2


def test_import_gives_transformers_logits(built):
    """Float32 logits within 1e-4 of transformers': over a whole sequence, and token by token after a cached
    prefill (transformers' cached decoding), both ways."""
    model, tok, extras = import_hf(built.hf_folder)
    assert model.config.extra["model_type"] == built.hf.config.model_type
    torch.testing.assert_close(model(TOKENS), hf_logits(built.hf, TOKENS), rtol=1e-4, atol=1e-4)
    cache = model.new_cache(2, 24)
    with torch.no_grad():
        steps = [model(TOKENS[:, :6], kv_cache=cache)] + [
            model(TOKENS[:, t : t + 1], kv_cache=cache) for t in range(6, 24)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), hf_logits(built.hf, TOKENS, stepwise_from=6), rtol=1e-4, atol=1e-4)
    assert tok.encode("hello there") == built.hf_tok("hello there", add_special_tokens=False)["input_ids"]
    assert json.loads(extras["generation_config.json"])["eos_token_id"] == built.ends


def test_greedy_tokens_match_transformers_generate_through_the_fused_step(built):
    model, _ = load_any(built.folder)
    reference = [hf_greedy(built.hf, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    assert [c.tokens for c in generate(model, PROMPTS, params)] == reference  # the plain path (padded batch)
    fused = prepare_for_decoding(copy.deepcopy(model))
    assert decode_path(fused) == "fused", unsupported_reason(fused)
    assert [c.tokens for c in generate(fused, PROMPTS, params)] == reference


def test_engine_serves_concurrent_requests_as_transformers_generates(built):
    """Several requests at once in the paged engine (blocks of 4 slots, prompts chunked by a small token budget),
    decoding through the fused step."""
    from lmforge.engine.engine import Engine

    model, _ = load_any(built.folder)
    reference = [hf_greedy(built.hf, p) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    plain = Engine(model, block_size=4, max_num_batched_tokens=8, max_num_seqs=3)
    assert [c.tokens for c in plain.generate(PROMPTS, params)] == reference
    engine = Engine(prepare_for_decoding(copy.deepcopy(model)), block_size=4, max_num_batched_tokens=8, max_num_seqs=3)
    assert engine.fused is not None
    assert [c.tokens for c in engine.generate(PROMPTS, params)] == reference
    assert engine.block_manager.num_used_blocks == 0


def test_engine_serves_base_and_three_lora_adapters_in_one_batch_as_their_merged_models(built):
    """Rows of the base and of three adapters (different ranks and targets, one on the output head) decode together
    through the fused step, around each family's q/k norms, sandwich norms, windows and soft-caps; each row gives
    the tokens and logprobs of the model with its own adapter merged, run through the model's own forward."""
    from lmforge.engine.engine import Engine
    from lmforge.infer.multi_lora import AdapterBank
    from lmforge.lora import merge_adapter
    from tests.test_multi_lora import ADAPTERS, random_adapter

    model, _ = load_any(built.folder)
    served = prepare_for_decoding(copy.deepcopy(model))
    bank = AdapterBank(served)
    adapters = {
        n: random_adapter(model, seed, rank, targets, scale=0.2) for n, (seed, rank, targets) in ADAPTERS.items()
    }
    for n, adapter in adapters.items():
        bank.add(n, adapter)
    names = [None, "a", "b", "c", "b"]
    prompts = PROMPTS + [TOKENS[0, 3:19].tolist(), TOKENS[1, 2:9].tolist()]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1)
    engine = Engine(served, block_size=4, max_num_batched_tokens=16, max_num_seqs=5, adapters=bank)
    assert engine.fused is not None
    got = engine.generate(prompts, params, adapters=names)
    for prompt, n, c in zip(prompts, names, got):
        merged = merge_adapter(copy.deepcopy(model), adapters[n], check_base=False) if n else model
        want = Engine(merged, block_size=4).generate([prompt], params)[0]
        assert c.tokens == want.tokens, n
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in c.logprobs]),
            torch.tensor([lp.logprob for lp in want.logprobs]),
            atol=1e-4,
            rtol=0,
        )


def test_export_loads_in_transformers_with_equal_logits(built, tmp_path):
    model, tok = load_any(built.folder)
    export_command(str(built.folder), str(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == built.hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, TOKENS), hf_logits(built.hf, TOKENS), rtol=1e-4, atol=1e-4)
    again, _, _ = import_hf(tmp_path / "back")  # and the round trip keeps every setting
    assert again.config.to_dict() | {"name": None} == model.config.to_dict() | {"name": None}


def test_chat_template_renders_a_conversation_as_transformers_does(built):
    messages = [
        {"role": "user", "content": "hello there "},
        {"role": "assistant", "content": "hi, how are you?"},
        {"role": "user", "content": "tell me about the fox."},
    ]
    if built.family.system:
        messages.insert(0, {"role": "system", "content": "You are a small model."})
    _, tok = load_any(built.folder)
    ours = ChatTemplate.for_model(built.folder, tok).render(messages)
    theirs = built.hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs and "fox" in ours


def test_dynamic_ntk_rope_matches_transformers_cached_decoding_past_the_original_context(tmp_path):
    """Dynamic NTK scaling (a Llama with rope_scaling "dynamic", original context 16, reaching 128): each position
    past 16 turns by the base its own length gives, as transformers' cached decoding computes it; prompts within
    the original context then give transformers.generate's greedy tokens through the fused step and the engine.
    (One transformers call over more than 16 tokens uses its last position's base for all of them: see
    lmforge.rope.rope_tables.)"""
    from lmforge.engine.engine import Engine

    family = Family(
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=8.0)),
        CHATML,
        [],
        [],
    )
    hf = hf_model(family)
    assert (hf_logits(hf, TOKENS, 6) - hf_logits(hf_model(family, dict()), TOKENS, 6)).abs().max() > 1e-2
    hf.save_pretrained(tmp_path)
    model, _, _ = import_hf(tmp_path)
    assert model.config.block_size == 128 and model.config.rope_scaling["type"] == "dynamic"
    cache = model.new_cache(2, 24)
    with torch.no_grad():
        steps = [model(TOKENS[:, :6], kv_cache=cache)] + [
            model(TOKENS[:, t : t + 1], kv_cache=cache) for t in range(6, 24)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), hf_logits(hf, TOKENS, 6), rtol=1e-4, atol=1e-4)
    prompts = [p[:10] for p in PROMPTS]
    params = SamplingParams(max_tokens=20, temperature=0)
    reference = [hf_greedy(hf, p, n=20) for p in prompts]
    fused = prepare_for_decoding(model)
    assert decode_path(fused) == "fused"
    assert [c.tokens for c in generate(fused, prompts, params)] == reference
    engine = Engine(fused, block_size=4, max_num_batched_tokens=8, max_num_seqs=3)
    assert [c.tokens for c in engine.generate(prompts, params)] == reference


def test_int8_weights_decode_through_the_fused_step_as_their_dequantized_twin(built):
    from lmforge.infer.generate import decode_step, prefill
    from lmforge.infer.quantize import Int8Linear, quantize_model

    model, _ = load_any(built.folder)
    quantized = quantize_model(copy.deepcopy(model), "int8")
    twin = copy.deepcopy(model)  # the float model holding exactly the dequantized weights
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear):
                twin.get_submodule(name).weight = torch.nn.Parameter(module.dequantized())
    fused = prepare_for_decoding(quantized)
    assert decode_path(fused) == "fused", unsupported_reason(fused)
    with torch.no_grad():
        want, want_cache = prefill(twin, PROMPTS, 32)
        cache = copy.deepcopy(want_cache)  # both decode from the same float prefill
        tokens = want.argmax(-1)
        for _ in range(12):  # past the windows and the original contexts
            want, got = decode_step(twin, tokens, want_cache), decode_step(fused, tokens, cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            tokens = want.argmax(-1)


def test_lora_and_full_fine_tuning_learn_a_chat_in_the_familys_template(built, tmp_path):
    """Both methods lower the held-out loss of a small chat set rendered with the family's own template; the LoRA
    adapter applied to the base gives the merged model's logits."""
    from lmforge.apps.finetune import FinetuneConfig, finetune_command
    from lmforge.interop.peft import read_adapter
    from lmforge.lora import merge_adapter

    turns = [
        ("hello there", "hi, how are you?"),
        ("tell me about the fox.", "the quick brown fox jumps."),
        ("count", "1, 2, 3."),
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            for q, a in turns * 4
        )
    )
    runs = {}
    for method in ("lora", "full"):
        out = tmp_path / method
        finetune_command(
            FinetuneConfig(
                str(built.folder),
                data=str(data),
                val_data=str(data),
                out=str(out),
                method=method,
                max_iters=8,
                eval_interval=4,
                batch_size=4,
                warmup_iters=0,
                lr=3e-3 if method == "lora" else 1e-3,
                merge=True,
                seed=0,
            )
        )
        losses = [
            json.loads(line)["val_loss"]
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in json.loads(line)
        ]
        assert losses[-1] < losses[0], (method, losses)
        runs[method] = out
    merged, _ = load_any(runs["lora"] / "best")
    base = load_any(built.folder)[0]
    adapted = merge_adapter(base, read_adapter(runs["lora"] / "adapter", base.config))
    with torch.no_grad():
        torch.testing.assert_close(adapted(TOKENS), merged(TOKENS), rtol=1e-4, atol=1e-4)


def test_explain_reports_the_attention_each_family_computes(built, tmp_path):
    """explain's weights @ V, through the output projection, are each layer's own attention output (windows,
    soft-caps, q/k norms, local RoPE tables and all)."""
    from lmforge.apps.explain import explain_command, forward_with_attention

    model, tok = load_any(built.folder)
    assert explain_command(str(built.folder), text="hello there, how are you today?", out=str(tmp_path / "x")) == 0
    ids = TOKENS[0, :20].tolist()
    seen = {}
    hooks = [
        b.attn.register_forward_hook(lambda m, args, out: seen.__setitem__(args[1], (args[0], args[2], out)))
        for b in model.blocks
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    _, weights = forward_with_attention(model, ids)
    for layer, block in enumerate(model.blocks):
        x, rope, y = seen[layer]
        with torch.no_grad():
            q, _, v = block.attn.project(x, rope)
            mixed = weights[layer][None] @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (1, nh, T, hs)
            torch.testing.assert_close(
                block.attn.proj(mixed.transpose(1, 2).reshape(1, len(ids), -1)), y, rtol=1e-4, atol=1e-4
            )


# What llama.cpp's architectures can express of each family (lmforge.interop.gguf refuses the rest, by name): it
# has no sliding window for llama (Mistral), qwen2 and phi3, and Gemma's window pattern, local RoPE base and score
# scale (head_dim^-1/2) are fixed in it. Gemma 3 gets six layers so one is global (with the linear scaling).
GGUF = {
    "llama3": {},
    "smollm2": {},
    "qwen2": dict(use_sliding_window=False),
    "qwen3": {},
    "mistral": dict(sliding_window=None),
    "phi3": dict(sliding_window=None),
    "gemma2": dict(query_pre_attn_scalar=24),
    "gemma3": dict(
        query_pre_attn_scalar=24, sliding_window_pattern=6, rope_local_base_freq=10000.0, num_hidden_layers=6
    ),
    "olmo2": {},
}


@pytest.mark.parametrize("name", NAMES)
def test_gguf_export_runs_in_llama_cpp_with_lmforges_logits(name, tmp_path):
    """The family's GGUF (llama.cpp's architecture for it, the tokenizer and chat template embedded) loaded by
    llama.cpp itself: the same tokens for a text and the same logits over a sequence longer than the windows and
    the original contexts (llama.cpp's GELU is an f16 table: Gemma's logits agree to ~1e-3)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llama-cpp`)")
    from lmforge.interop.gguf import export_gguf

    family = FAMILIES[name]
    hf, hf_tok = hf_model(family, family.settings | GGUF[name]), tokenizer_for(family)
    hf.save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    import_command(str(tmp_path / "hf"), str(tmp_path / "ours"))
    loaded = read(tmp_path / "ours")
    model, tok, extras = loaded.model, loaded.tokenizer, loaded.extras
    done = export_gguf(model, tok, tmp_path / "m.gguf", "f32", extras=extras)
    llm = llama_cpp.Llama(
        model_path=str(done.path),
        n_ctx=model.config.block_size,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
    )  # f32 keys and values, as lmforge's
    assert llm.metadata["general.architecture"] == done.arch and "tokenizer.chat_template" in llm.metadata
    text = "hello there, how are you today? 12345 apples"  # digits: Llama 3 splits them by 3, Qwen2 by 1
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    ids = TOKENS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    tolerance = 2e-3 if done.arch.startswith("gemma") else 1e-4
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tolerance * float(ours.abs().max()))


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("mistral", {}, "sliding_window=8 .llama.cpp's llama attends over the whole context"),
        ("qwen2", {}, "sliding_window=8"),
        ("phi3", {}, "sliding_window=8"),
        ("gemma2", {}, "query_pre_attn_scalar must be head_dim"),
        ("gemma3", dict(query_pre_attn_scalar=24), "window_layers=.0, 2. .llama.cpp's gemma3 windows layers .0, 1, 2."),
    ],
)
def test_gguf_export_refuses_what_llama_cpp_would_compute_differently(name, settings, message, tmp_path):
    from lmforge.interop.gguf import export_gguf

    family = FAMILIES[name]
    model = import_hf(save_hf_folder(family, family.settings | settings, tmp_path))[0]
    with pytest.raises(UnsupportedModelError, match=message):
        export_gguf(model, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def save_hf_folder(family: Family, settings: dict, folder: Path) -> Path:
    hf_model(family, settings).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("llama3", {"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "rope type 'mrope'"),
        ("llama3", {"attention_bias": True}, "attention_bias=True"),
        ("llama3", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"attention_bias": True}, "attention_bias=True"),
        ("qwen3", {"attention_bias": True}, "attention_bias=True"),
        ("phi3", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ],
)
def test_a_setting_lmforge_does_not_implement_is_refused_by_name(name, change, message):
    config = json.loads(hf_model(FAMILIES[name]).config.to_json_string()) | change
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(config)


def test_gemma3_image_text_models_are_refused_with_the_text_model_named():
    with pytest.raises(UnsupportedModelError, match="gemma3_text"):
        config_from_hf({"model_type": "gemma3", "text_config": {}})


def test_export_of_an_architecture_no_family_has_says_why(tmp_path):
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    model = Transformer(ModelConfig.from_name("llama-nano", norm_placement="output"))  # OLMo 2 norms, Llama rest
    with pytest.raises(UnsupportedModelError, match="norm_placement='output'"):
        export_hf(model, None, tmp_path / "x")


# ------------------------------------------------------------------------------------------------- serving


def test_serve_answers_like_transformers_and_stops_at_every_eos_id(built, tmp_path):
    """`lmforge serve` on the imported folder, driven by the official openai client: concurrent completions give
    transformers' greedy tokens; a token that generation_config.json adds to the EOS ids ends them where
    transformers.generate (given the same ids) ends; chat renders the folder's template."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from lmforge.serve.process import start_server, stop_server

    first = hf_greedy(built.hf, PROMPTS[0])
    stop_at = first[5]  # a token greedy decoding reaches: made an EOS id, it must end the output there
    ends = built.ends + [stop_at]
    folder = tmp_path / "served"
    shutil.copytree(built.folder, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": ends}))
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "how are you?"},
    ]
    rendered = built.hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_prompt = built.hf_tok(rendered, add_special_tokens=False)["input_ids"]

    proc, base = start_server(str(folder), "--log-level", "warning", "--max-batch", "3")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

        def complete(prompt):
            return client.completions.create(model=folder.name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)

        with ThreadPoolExecutor(3) as pool:  # three requests in the engine at once
            answers = list(pool.map(complete, PROMPTS))
        chat = client.chat.completions.create(model=folder.name, messages=messages, max_tokens=6, temperature=0)
    finally:
        assert stop_server(proc) in (0, -15)
    for prompt, answer in zip(PROMPTS, answers):
        want = hf_greedy(built.hf, prompt, eos=ends)
        finished = want and want[-1] in ends
        want = want[:-1] if finished else want
        assert answer.choices[0].text == built.hf_tok.decode(want)
        assert answer.choices[0].finish_reason == ("stop" if finished else "length")
    assert answers[0].choices[0].finish_reason == "stop" and answers[0].usage.completion_tokens == first.index(stop_at)
    want = hf_greedy(built.hf, chat_prompt, n=6, eos=ends)
    want = want[:-1] if want and want[-1] in ends else want
    assert chat.choices[0].message.content == built.hf_tok.decode(want)
