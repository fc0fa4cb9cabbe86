"""The fused C++ decode step (lmforge.infer.fused) against the model's own forward pass, op by op in PyTorch."""

import copy
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.infer.fused import _load_extension, decode_path, prepare_for_decoding, unsupported_reason
from lmforge.infer.generate import decode_step, generate, prefill
from lmforge.infer.packed import PackedLinear, bf16_gemm_available
from lmforge.infer.quantize import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8, quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import speculative_generate
from lmforge.model import Transformer

if (
    shutil.which("c++") is None
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
    or not Path(sysconfig.get_paths()["include"], "Python.h").exists()
):
    pytest.skip("the fused decode step needs a C++ compiler, Python's headers and an AVX2 CPU", allow_module_level=True)


@pytest.fixture(scope="module")
def ext():
    extension = _load_extension()
    assert extension is not None, "the extension must build where a compiler and AVX2 are present"
    return extension


@pytest.mark.parametrize("B", [1, 2, 3, 5, 8, 13, 32])
@pytest.mark.parametrize("K, N", [(96, 200), (100, 7), (384, 1152)])
@pytest.mark.parametrize(
    "act, ref", [(0, lambda y: y), (1, F.gelu), (2, lambda y: F.gelu(y, approximate="tanh")), (3, F.relu)]
)
def test_linear_kernel_equals_f_linear(ext, B, K, N, act, ref):
    torch.manual_seed(B * K)
    x, w, b = torch.randn(B, K), torch.randn(N, K) / K**0.5, torch.randn(N)
    none = torch.Tensor()
    torch.testing.assert_close(ext.linear_act(x, w, none, b, act), ref(F.linear(x, w, b)), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ext.linear_act(x, w, none, none, act), ref(F.linear(x, w)), atol=2e-5, rtol=1e-5)
    q, scales = quantize_int8(w)  # int8 weights: the same product with the dequantized float weight
    want = ref(F.linear(x, q.float() * scales[:, None], b))
    torch.testing.assert_close(ext.linear_act(x, q, scales, b, act), want, atol=2e-5, rtol=1e-5)
    if K % 32 == 0:  # 4-bit weights (32-value blocks): the product with the dequantized weight, in float64
        q4, s4 = quantize_int4(w)
        want = ref(F.linear(x.double(), dequantize_int4(q4, s4).double(), b.double())).float()
        torch.testing.assert_close(ext.linear_act(x, q4, s4, b, act), want, atol=2e-5, rtol=1e-5)


CONFIGS = {
    "gpt": ("gpt-nano", dict()),
    "gpt-no-bias-untied-tanh": ("gpt-nano", dict(bias=False, tie_embeddings=False, mlp="gelu_tanh")),
    "gpt-relu-gqa": ("gpt-nano", dict(mlp="relu", n_kv_head=2)),
    "llama-gqa": ("llama-nano", dict()),  # RMSNorm, rotary positions, SwiGLU, 4 query heads on 2 kv heads
    "llama-odd-head-size": ("llama-nano", dict(n_embd=120, n_head=4, n_kv_head=4, intermediate_size=100)),
    # The imported families' pieces (lmforge.interop.hf_families), each where the test's positions reach it: the
    # prompts run 2-7 tokens and 6 decode steps follow, past windows of 3-5 and original contexts of 8.
    "llama3-rope-scaling": (
        "llama-nano",
        dict(
            rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8)
        ),
    ),
    "qwen2-qkv-bias-yarn": (
        "llama-nano",
        dict(qkv_bias=True, rope_scaling=dict(type="yarn", factor=4.0, original_context=8)),
    ),
    "qwen3-qk-norm-wide-heads": ("llama-nano", dict(qk_norm="head", head_size=40)),
    "mistral-window": ("llama-nano", dict(sliding_window=4)),
    "phi3-longrope-partial-window": (
        "llama-nano",
        dict(
            rope_dim=16,
            sliding_window=5,
            rope_scaling=dict(
                type="longrope",
                short_factor=[1.0 + i / 8 for i in range(8)],
                long_factor=[2.0 + i for i in range(8)],
                original_context=8,
                factor=8.0,
            ),
        ),
    ),
    "gemma2-sandwich-geglu-softcaps": (
        "llama-nano",
        dict(
            norm_placement="sandwich",
            mlp="geglu_tanh",
            embed_scale=True,
            attn_scale=0.2,
            attn_softcap=2.0,
            logit_softcap=1.5,
            sliding_window=3,
            window_layers=[0],
            head_size=24,
            tie_embeddings=True,
        ),
    ),
    "gemma3-local-rope-qk-norm": (
        "llama-nano",
        dict(
            norm_placement="sandwich",
            mlp="geglu_tanh",
            qk_norm="head",
            sliding_window=3,
            window_layers=[0],
            rope_local_base=100.0,
            rope_scaling=dict(type="linear", factor=4.0),
        ),
    ),
    "olmo2-output-norms-proj-qk-norm": ("llama-nano", dict(norm_placement="output", qk_norm="proj")),
}


BIT_IDENTICAL = [
    "gpt",
    "mistral-window",
    "gemma2-sandwich-geglu-softcaps",
    "gemma3-local-rope-qk-norm",
    "olmo2-output-norms-proj-qk-norm",
    "phi3-longrope-partial-window",
]


@pytest.mark.parametrize("K, N", [(100, 7), (384, 1152), (96, 13)])
def test_linear_kernel_rows_do_not_depend_on_the_batch(ext, K, N):
    """Whatever tiles a batch is cut into (they differ with the row count and the CPU), each row's outputs are the
    bits it gets alone: float32, int8 and 4-bit weights."""
    torch.manual_seed(K)
    x, w, b = torch.randn(32, K), torch.randn(N, K) / K**0.5, torch.randn(N)
    q, scales = quantize_int8(w)
    none = torch.Tensor()
    for weight, scale in ((w, none), (q, scales)) + ((quantize_int4(w),) if K % 32 == 0 else ()):
        alone = torch.cat([ext.linear_act(x[i : i + 1], weight, scale, b, 0) for i in range(32)])
        for B in (2, 3, 4, 5, 6, 7, 8, 13, 32):
            assert torch.equal(ext.linear_act(x[:B], weight, scale, b, 0), alone[:B]), B


@pytest.mark.parametrize("preset, overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_fused_step_equals_the_model_step_with_padding(ext, preset, overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: activations reach GELU's tails
            p.add_(torch.randn_like(p) * 0.05)
    fused = prepare_for_decoding(copy.deepcopy(model))
    assert decode_path(fused) == "fused" and decode_path(model) == "plain"
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]  # left padding of 0, 5 and 3 slots
    with torch.no_grad():
        want, want_cache = prefill(model, prompts, 20)
        got, cache = prefill(fused, prompts, 20)
        tokens = want.argmax(-1)
        for _ in range(6):
            want, got = decode_step(model, tokens, want_cache), decode_step(fused, tokens, cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            tokens = want.argmax(-1)
    assert cache.length == want_cache.length
    torch.testing.assert_close(cache.k, want_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v, want_cache.v, atol=1e-5, rtol=1e-5)


def test_fused_generation_equals_plain_generation(ext):
    """Greedy and seeded sampling, rows finishing at different steps (the cache shrinks), n samples per prompt."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=2)).eval()
    fused = prepare_for_decoding(copy.deepcopy(model))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    params = [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=5, temperature=0),
        SamplingParams(max_tokens=9, temperature=0.9, seed=7, n=2),
    ]
    want = [c.tokens for c in generate(model, prompts, params)]
    assert [c.tokens for c in generate(fused, prompts, params)] == want
    assert [len(t) for t in want] == [12, 5, 9, 9]


@pytest.mark.parametrize("preset, overrides", [CONFIGS[k] for k in BIT_IDENTICAL], ids=BIT_IDENTICAL)
def test_a_rows_logits_do_not_depend_on_the_batch_or_on_tokens_per_call(ext, preset, overrides):
    """Bit-identical: a row alone or among others, its tokens one per call or three at once (speculative
    verification feeds several tokens, plain decoding one: greedy outputs must agree exactly). Windows, soft-caps,
    q/k norms and output norms keep it (LongRoPE too while no row crosses its original context: a row's new
    tokens turn by the long factors once its last one is past it, as transformers does)."""
    torch.manual_seed(3)
    model = prepare_for_decoding(
        Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2, **overrides)).eval()
    )
    prompts = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 10, 11, 12]]
    new = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])

    def row_cache(batch_cache, b):  # row b of a prefilled cache on its own: the same prefix, bit for bit
        cache = model.new_cache(1, 10)  # (prefill's GEMMs may round differently at another batch size)
        cache.k.copy_(batch_cache.k[:, b : b + 1]), cache.v.copy_(batch_cache.v[:, b : b + 1])
        cache.length = batch_cache.length
        return cache

    with torch.no_grad():
        _, batch_cache = prefill(model, prompts, 10)
        alone_cache, chunk_cache = row_cache(batch_cache, 1), row_cache(batch_cache, 1)
        batched = torch.stack([decode_step(model, new[:, t], batch_cache) for t in range(3)], dim=1)  # (3, 3, V)
        alone = torch.stack([decode_step(model, new[1:2, t], alone_cache) for t in range(3)], dim=1)
        chunk = model.fused_decoder(new[1:2], chunk_cache, last=3)  # (1, 3, V) in one call
    assert torch.equal(alone[0], batched[1]) and torch.equal(chunk[0], alone[0])
    assert torch.equal(chunk_cache.k, alone_cache.k) and chunk_cache.length == alone_cache.length == 7
    reference = Transformer(model.config)  # the same weights through the model's own forward
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = reference.eval()(torch.tensor([prompts[1] + new[1].tolist()]))[0, -3:]
    torch.testing.assert_close(chunk[0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4])
def test_fused_speculative_greedy_is_plain_fused_greedy(ext, k):
    torch.manual_seed(4)
    target = prepare_for_decoding(Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=3)).eval())
    draft = prepare_for_decoding(Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=1)).eval())
    params = SamplingParams(max_tokens=30, temperature=0)
    plain = generate(target, [[1, 2, 3]], params)[0].tokens
    tokens, stats = speculative_generate(target, draft, [1, 2, 3], params, k=k)
    assert tokens == plain and stats["rounds"] < 30


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_serving_engine_decodes_through_the_fused_step(ext, preset):
    """The engine's decoding rows (paged KV cache, block tables, rows at different lengths joining and leaving,
    chunked prompts, a pool small enough to preempt) through the fused step give the model's own greedy tokens."""
    from lmforge.engine.engine import Engine

    torch.manual_seed(5)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2)).eval()
    fused = prepare_for_decoding(copy.deepcopy(model))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 30, 1, 13, 9)]
    params = SamplingParams(max_tokens=12, temperature=0)
    engine = Engine(fused, block_size=4, num_blocks=14, max_num_batched_tokens=12, max_num_seqs=4)
    assert engine.fused is fused.fused_decoder
    got = [c.tokens for c in engine.generate(prompts, params)]
    assert engine.stats()["preemptions"] > 0 and engine.block_manager.num_used_blocks == 0
    assert got == [c.tokens for c in generate(model, prompts, params)]
    assert Engine(model, block_size=4).fused is None  # an unprepared model keeps the model's own forward

    half = Engine(fused, block_size=4, num_blocks=14, max_num_batched_tokens=12, max_num_seqs=4, kv_dtype=torch.float16)
    assert half.fused is fused.fused_decoder and half.cache.bytes_per_token * 2 == engine.cache.bytes_per_token
    eager_half = Engine(
        model, block_size=4, num_blocks=14, max_num_batched_tokens=12, max_num_seqs=4, kv_dtype=torch.float16
    )
    assert [c.tokens for c in half.generate(prompts, params)] == [
        c.tokens for c in eager_half.generate(prompts, params)
    ]


def test_engine_speculation_through_the_fused_step_keeps_plain_greedy(ext):
    """Draft steps and the target's k + 1 token checks take the fused step (rows grouped by feed length); the
    greedy tokens stay the target's own, and the target as its own draft has every proposal accepted."""
    from lmforge.engine.engine import Engine

    torch.manual_seed(9)
    model = Transformer(ModelConfig.from_name("llama-nano", vocab_size=97, n_layer=2)).eval()
    draft = Transformer(ModelConfig.from_name("llama-nano", vocab_size=97, n_layer=1)).eval()
    target, fast_draft = prepare_for_decoding(copy.deepcopy(model)), prepare_for_decoding(copy.deepcopy(draft))
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 30, 1, 13, 9)]
    params = SamplingParams(max_tokens=14, temperature=0)
    plain = [c.tokens for c in generate(model, prompts, params)]
    engine = Engine(
        target,
        block_size=4,
        num_blocks=40,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        draft=fast_draft,
        num_speculative_tokens=3,
    )
    assert [c.tokens for c in engine.generate(prompts, params)] == plain
    stats = engine.stats()
    assert 0 < stats["draft_accepted"] < stats["draft_proposed"]
    own = Engine(target, block_size=4, num_blocks=64, draft=target, num_speculative_tokens=4)
    assert [c.tokens for c in own.generate(prompts, params)] == plain
    assert own.stats()["draft_accepted"] == own.stats()["draft_proposed"] > 0


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_float16_kv_pool_is_read_and_written_as_torch_rounds_it(ext, preset):
    """A float16 pool under a float32 model: the fused step writes keys rounded as torch's .half() rounds them and
    attends over the stored values as the model's own path does; the logits move by rounding, not more."""
    from lmforge.engine.paged_cache import PagedKVCache, block_table_tensor

    torch.manual_seed(7)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2)).eval()
    fused = prepare_for_decoding(copy.deepcopy(model)).fused_decoder
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 21, 4)]
    tables = [[3, 0], [5, 1], [7]]  # blocks of 16 slots
    nxt = [int(t) for t in torch.randint(0, 97, (3,), generator=g)]
    logits: dict = {}
    pools32: dict = {}  # the float32 pass's pools, which the float16 pass compares against
    for dtype in (torch.float32, torch.float16):
        pools = {}
        for path in ("fused", "model"):
            cache = PagedKVCache(model.config, 8, 16, dtype=dtype)
            with torch.no_grad():
                cache.prepare(tables, [0] * 3, [len(p) for p in prompts])  # prefill through the model
                tokens = torch.zeros(3, max(map(len, prompts)), dtype=torch.long)
                for b, p in enumerate(prompts):
                    tokens[b, : len(p)] = torch.tensor(p)
                model.hidden(tokens, kv_cache=cache)
                if path == "fused":
                    table = block_table_tensor(tables)
                    logits[dtype, path] = fused.paged([[t] for t in nxt], cache, table, [len(p) for p in prompts])[:, 0]
                else:
                    cache.prepare(tables, [len(p) for p in prompts], [1] * 3)
                    logits[dtype, path] = model.lm_head(model.hidden(torch.tensor(nxt)[:, None], kv_cache=cache)[:, 0])
            pools[path] = cache
        assert pools["fused"].k.dtype == dtype
        torch.testing.assert_close(logits[dtype, "fused"], logits[dtype, "model"], rtol=0, atol=1e-4)
        if dtype == torch.float16:  # layer 0's keys and values depend on no attention: the float32 ones, rounded
            for b, p in enumerate(prompts):
                blk, off = tables[b][len(p) // 16], len(p) % 16  # the slot the fused step wrote
                for name in ("k", "v"):
                    wide, narrow = getattr(pools32["fused"], name), getattr(pools["fused"], name)
                    assert torch.equal(narrow[0, blk, off], wide[0, blk, off].half())
                    assert torch.equal(
                        narrow[0, tables[b][0], : min(len(p), 16)], wide[0, tables[b][0], : min(len(p), 16)].half()
                    )  # prefill's, by torch
        pools32 = pools
    drift = (logits[torch.float16, "fused"] - logits[torch.float32, "fused"]).abs().max()
    assert 0 < drift < 2e-2  # float16 is in effect, and it only rounds


bf16_packs = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="oneDNN has no bfloat16 kernels for this CPU: bfloat16 models stay plain",
)


@bf16_packs
@pytest.mark.parametrize("preset, overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_bfloat16_model_decodes_through_onednn_within_bfloat16_rounding(ext, preset, overrides):
    """A bfloat16 model's linear layers are packed for oneDNN and the fused step multiplies by them, its KV cache
    bfloat16: logits as near the exact float32 result (the same bfloat16 weights, widened) as PyTorch's own bfloat16
    forward gets."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bf16 = model.to(torch.bfloat16)
    exact = copy.deepcopy(bf16).float()  # the same weights, float32 arithmetic
    fused = prepare_for_decoding(copy.deepcopy(bf16))
    assert decode_path(fused) == "fused" and isinstance(fused.lm_head, PackedLinear)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    with torch.no_grad():
        want, want_cache = prefill(exact, prompts, 20)
        got, cache = prefill(fused, prompts, 20)
        eager, eager_cache = prefill(bf16, prompts, 20)
        assert cache.k.dtype == torch.bfloat16
        tokens = want.argmax(-1)
        for _ in range(6):
            want = decode_step(exact, tokens, want_cache)
            got, eager = decode_step(fused, tokens, cache), decode_step(bf16, tokens, eager_cache)
            err, torch_err = (got.float() - want).abs().max(), (eager.float() - want).abs().max()
            assert err <= 2 * torch_err and err < 0.02 * want.abs().max()
            tokens = want.argmax(-1)


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_rows_of_different_lengths_share_one_call_and_each_gets_what_it_gets_alone(ext, preset):
    """A ragged paged call (a speculative check of 4 and 2 tokens beside a plain 1-token row): each row's logits and
    the keys and values it writes are bit-identical to a call of that row alone, its logits match the model's own
    forward, and no slot past a row's own tokens is written (its padding is not computed)."""
    from lmforge.engine.paged_cache import PagedKVCache, block_table_tensor

    torch.manual_seed(3)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2)).eval()
    fused = prepare_for_decoding(copy.deepcopy(model)).fused_decoder
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 21, 4)]
    feeds = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (4, 1, 2)]
    tables = [[3, 0], [5, 1], [7]]  # blocks of 16 slots
    starts = [len(p) for p in prompts]

    def prefilled():
        cache = PagedKVCache(model.config, 8, 16)
        cache.k.fill_(7.0), cache.v.fill_(7.0)  # a value no step writes: slots left alone keep it
        with torch.no_grad():
            cache.prepare(tables, [0] * 3, starts)
            tokens = torch.zeros(3, max(starts), dtype=torch.long)
            for b, p in enumerate(prompts):
                tokens[b, : len(p)] = torch.tensor(p)
            model.hidden(tokens, kv_cache=cache)
        return cache

    together = prefilled()
    got = fused.paged(feeds, together, block_table_tensor(tables), starts, last=4)  # (3, 4, V)
    assert got.shape == (3, 4, 97)
    for b in range(3):
        alone = prefilled()
        want = fused.paged([feeds[b]], alone, block_table_tensor([tables[b]]), [starts[b]], last=len(feeds[b]))[0]
        n = len(feeds[b])
        assert torch.equal(got[b, :n], want) and not got[b, n:].any()  # the row's logits first, zeros after
        slots = [tables[b][s // 16] * 16 + s % 16 for s in range(starts[b], starts[b] + 4)]
        for name in ("k", "v"):
            pool, own = getattr(together, name).flatten(1, 2), getattr(alone, name).flatten(1, 2)
            assert torch.equal(pool[:, slots[:n]], own[:, slots[:n]])
            assert (pool[:, slots[n:]] == 7.0).all()  # past the row's tokens: untouched
        with torch.no_grad():
            full = model(torch.tensor([prompts[b] + feeds[b]]))
            full = full[0] if isinstance(full, tuple) else full
        torch.testing.assert_close(got[b, :n], full[0, starts[b] :], rtol=0, atol=1e-4)
    last_only = fused.paged(feeds, prefilled(), block_table_tensor(tables), starts)[:, 0]
    assert torch.equal(last_only, torch.stack([got[0, 3], got[1, 0], got[2, 1]]))  # each row's last token


@bf16_packs
def test_serving_engine_runs_bfloat16_models_through_the_fused_step(ext):
    """Paged pools in bfloat16 and float16 under a bfloat16 model: the engine's decoding rows take the fused step and
    their logits stay within bfloat16 rounding of the exact float32 ones."""
    from lmforge.engine.engine import Engine
    from lmforge.engine.paged_cache import PagedKVCache, block_table_tensor

    torch.manual_seed(7)
    model = Transformer(ModelConfig.from_name("llama-nano", vocab_size=97, n_layer=2)).eval().to(torch.bfloat16)
    exact = copy.deepcopy(model).float()
    fused = prepare_for_decoding(copy.deepcopy(model))
    assert Engine(fused, block_size=4).fused is fused.fused_decoder
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 21, 4)]
    tables, nxt = [[3, 0], [5, 1], [7]], [[int(t)] for t in torch.randint(0, 97, (3,), generator=g)]
    lengths = [len(p) for p in prompts]
    with torch.no_grad():
        want, _ = prefill(exact, [p + t for p, t in zip(prompts, nxt)], 32)  # every prompt and its next token
        for dtype in (torch.bfloat16, torch.float16):
            cache = PagedKVCache(model.config, 8, 16, dtype=dtype)
            cache.prepare(tables, [0] * 3, lengths)  # each prompt through the model, right-padded
            tokens = torch.zeros(3, max(lengths), dtype=torch.long)
            for b, p in enumerate(prompts):
                tokens[b, : len(p)] = torch.tensor(p)
            fused.hidden(tokens, kv_cache=cache)
            got = fused.fused_decoder.paged(nxt, cache, block_table_tensor(tables), lengths)[:, 0]
            assert (got - want).abs().max() < 0.02 * want.abs().max()


def dequantized_twin(model, quantized):
    """The float model holding the quantized model's dequantized weights (an independent reference)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (Int8Linear, Int4Linear)):
                twin.get_submodule(name).weight = torch.nn.Parameter(module.dequantized())
    return twin


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_quantized_model_decodes_as_its_dequantized_float_twin(ext, preset, mode):
    """The fused int8 / 4-bit step, and the quantized model's own prefill (one GEMM over the dequantized weights per
    layer, in bfloat16 where oneDNN has it; the head's few rows through the step's kernel), against an independent
    reference: the float model holding the dequantized weights. Float32 rounding apart for the step."""
    torch.manual_seed(2)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=97, n_layer=2)).eval()
    quantized = quantize_model(copy.deepcopy(model), mode)
    twin = dequantized_twin(model, quantized)
    fused = prepare_for_decoding(quantized)
    assert decode_path(fused) == "fused" and isinstance(fused.lm_head, Int4Linear if mode == "int4" else Int8Linear)
    prompts = [list(range(1, 41)), [5, 6]]  # 2 x 40 rows: the prompt's products take the GEMM path
    with torch.no_grad():
        want, want_cache = prefill(twin, prompts, 50)
        got, cache = prefill(fused, prompts, 50)
        assert (got - want).abs().max() < (0.02 if bf16_gemm_available() else 1e-4) * want.abs().max()
        cache = copy.deepcopy(want_cache)  # the steps from the same prefill: float32 against float32
        tokens = want.argmax(-1)
        for _ in range(5):
            want, got = decode_step(twin, tokens, want_cache), decode_step(fused, tokens, cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            tokens = want.argmax(-1)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_decodes_quantized_models_through_the_fused_step(ext, mode):
    """The serving engine's batched decode on int8 and 4-bit weights takes the fused step, and requests served
    together (joining and leaving, a pool small enough to preempt) get exactly the tokens each gets alone."""
    from lmforge.engine.engine import Engine

    torch.manual_seed(11)
    model = quantize_model(Transformer(ModelConfig.from_name("llama-nano", vocab_size=97, n_layer=2)).eval(), mode)
    fused = prepare_for_decoding(model)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 30, 1, 13, 9)]
    params = SamplingParams(max_tokens=12, temperature=0)
    engine = Engine(fused, block_size=4, num_blocks=14, max_num_batched_tokens=12, max_num_seqs=4)
    assert engine.fused is fused.fused_decoder
    together = [c.tokens for c in engine.generate(prompts, params)]
    assert engine.stats()["preemptions"] > 0
    alone = [Engine(fused, block_size=4, num_blocks=14).generate([p], params)[0].tokens for p in prompts]
    assert together == alone == [c.tokens for c in generate(fused, prompts, params)]


def test_other_models_fall_back_to_packed_linears(ext):
    classic = Transformer(ModelConfig.from_name("seed", vocab_size=64, n_layer=1)).eval()  # post-norm, sinusoidal
    assert "post" in unsupported_reason(classic)
    assert decode_path(prepare_for_decoding(classic)) == "packed"
    bf16 = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=1)).to(torch.bfloat16).eval()
    assert "packed for oneDNN" in unsupported_reason(bf16)  # unpacked bfloat16 layers are not the step's to run
    float16 = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=1)).to(torch.float16).eval()
    assert "float32, bfloat16" in unsupported_reason(float16)
    assert decode_path(prepare_for_decoding(float16)) == "plain"


def test_bad_tokens_and_full_caches_are_errors_not_crashes(ext):
    model = prepare_for_decoding(Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=1)).eval())
    _, cache = prefill(model, [[1, 2, 3]], 4)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        decode_step(model, torch.tensor([64]), cache)
    decode_step(model, torch.tensor([5]), cache)  # the 4th and last slot
    with pytest.raises(RuntimeError, match="KV cache is full"):
        decode_step(model, torch.tensor([5]), cache)
