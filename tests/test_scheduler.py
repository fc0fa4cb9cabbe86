"""The scheduler driven by hand: schedule(), then update_from_output() with made-up tokens; no model.

As vLLM's tests/v1/core/test_scheduler.py: every step we check who runs, how many tokens each computes, and that
KV blocks are taken and given back as the requests come and go.
"""

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import Sequence, Status
from lmforge.infer.sampling import SamplingParams

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget)


def request(name, prompt_len, max_tokens=8, first_token=1, **kw):
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(name, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **kw), eos_id=EOS)


def step(sched, token=7):
    """One step whose sampled token is `token` for every row that caught up; returns {request: new tokens}."""
    out = sched.schedule()
    plan = {s.request_id: n for s, n in out.scheduled}
    sampled = {s.seq_id: [token] for s, n in out.scheduled if out.samples(s, n)}
    sched.update_from_output(out, sampled)
    return plan, out


def test_a_request_joins_the_running_batch_between_steps_and_leaves_when_done():
    sched = make_scheduler()
    a = request("a", 5, max_tokens=3)
    sched.add(a)
    assert step(sched)[0] == {"a": 5}  # the whole prompt: it fits the budget
    b = request("b", 6, max_tokens=5, first_token=20)
    sched.add(b)
    assert step(sched)[0] == {"a": 1, "b": 6}  # a keeps decoding while b prefills
    assert step(sched)[0] == {"a": 1, "b": 1}
    assert a.finished and a.finish_reason == "length" and a.output_ids == [7, 7, 7]
    assert a not in sched.running and a.block_table == []
    assert step(sched)[0] == {"b": 1}


def test_long_prompt_is_chunked_under_the_budget_while_running_requests_decode_every_step():
    sched = make_scheduler(budget=8)
    a = request("a", 3, max_tokens=20)
    sched.add(a)
    step(sched)
    long = request("long", 30, first_token=100)
    sched.add(long)
    plans = [step(sched)[0] for _ in range(5)]
    assert plans == [
        {"a": 1, "long": 7},
        {"a": 1, "long": 7},
        {"a": 1, "long": 7},
        {"a": 1, "long": 7},
        {"a": 1, "long": 2},
    ]
    assert long.output_ids == [7] and long.num_computed_tokens == 30  # sampled only once the prompt was done
    assert step(sched)[0] == {"a": 1, "long": 1}
    assert all(sum(p.values()) <= 8 for p in plans)


def test_running_decodes_go_first_even_when_an_older_request_is_still_prefilling():
    sched = make_scheduler(budget=8)
    long = request("long", 20)
    sched.add(long)
    assert step(sched)[0] == {"long": 8}
    short = request("short", 2, first_token=50)
    sched.add(short)
    assert step(sched)[0] == {"long": 8}  # no budget left for short this step
    assert step(sched)[0] == {"long": 4, "short": 2}
    assert step(sched)[0] == {"long": 1, "short": 1}


def test_stop_token_and_eos_end_a_request_without_entering_the_output():
    sched = make_scheduler()
    a, b = request("a", 3), request("b", 3, first_token=20, stop_token_ids=[9])
    sched.add(a), sched.add(b)
    step(sched, token=5)
    out = sched.schedule()
    sched.update_from_output(out, {a.seq_id: [EOS], b.seq_id: [9]})
    assert (a.finish_reason, b.finish_reason) == ("stop", "stop")
    assert a.output_ids == [5] and b.output_ids == [5]
    assert not sched.has_unfinished() and sched.block_manager.num_used_blocks == 0


def test_ignore_eos_keeps_going():
    sched = make_scheduler()
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), eos_id=EOS)
    sched.add(a)
    for _ in range(3):
        step(sched, token=EOS)
    assert a.output_ids == [EOS] * 3 and a.finish_reason == "length"


def test_abort_frees_blocks_at_once_running_or_waiting():
    sched = make_scheduler(max_num_seqs=1)
    a, b = request("a", 9), request("b", 9, first_token=40)
    sched.add(a), sched.add(b)
    step(sched)
    used = sched.block_manager.num_used_blocks
    assert used == 3 and b.status is Status.WAITING  # max_num_seqs=1 keeps b waiting
    sched.abort(a)
    assert sched.block_manager.num_used_blocks == 0 and a.finish_reason == "abort" and a.block_table == []
    sched.abort(b)
    assert not sched.has_unfinished()


def test_preemption_frees_the_newest_request_and_it_recomputes_later():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)  # 16 slots in all
    a, b = request("a", 7, max_tokens=8), request("b", 7, max_tokens=8, first_token=30)
    sched.add(a), sched.add(b)
    assert step(sched)[0] == {"a": 7, "b": 7}  # 2 blocks each: the pool is full
    assert step(sched)[0] == {"a": 1, "b": 1}  # slot 7 of each still fits
    plan, out = step(sched)  # slot 8 needs a third block: b (newest) gives its blocks to a
    assert plan == {"a": 1} and out.preempted == [b]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.output_ids == [7, 7]  # what it generated is kept and will be recomputed as its prompt
    while not a.finished:
        step(sched)
    plan, _ = step(sched)
    assert plan == {"b": 9} and b.num_cached_tokens == 0  # re-prefill of prompt + output (its blocks were evicted)
    while sched.has_unfinished():
        step(sched)
    assert b.output_ids == [7] * 8 and sched.num_preemptions == 1
    assert sched.block_manager.num_used_blocks == 0


def test_prefix_cache_hit_skips_computed_tokens():
    sched = make_scheduler(block_size=4)
    a = request("a", 10, max_tokens=1)
    sched.add(a)
    step(sched)
    assert a.finished
    b = request("b", 10, max_tokens=1)  # the same prompt
    sched.add(b)
    assert step(sched)[0] == {"b": 2}  # 8 tokens (2 full blocks) served from the cache
    assert b.num_cached_tokens == 8 and sched.num_prefix_hit_tokens == 8


def test_max_num_seqs_caps_the_running_batch():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [request(str(i), 3, max_tokens=2, first_token=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert step(sched)[0] == {"0": 3, "1": 3}
    assert step(sched)[0] == {"0": 1, "1": 1}  # both finish here
    assert step(sched)[0] == {"2": 3}


def test_a_longrope_sequence_growing_past_its_switch_is_computed_again_under_its_own_prefix_hashes():
    """LongRoPE (recompute_at = the original context, 8 here): once a sequence is longer, every key turns by the
    long factors, so it gives its blocks back and is computed again in full; its new blocks hash apart from the
    short-factor blocks of the same tokens, which a short sequence still finds."""
    sched = Scheduler(BlockManager(64, 4), 8, 32, recompute_at=8)
    a = request("a", 8, max_tokens=4)
    sched.add(a)
    assert step(sched)[0] == {"a": 8} and a.cache_salt is None  # 8 tokens: short factors
    short_blocks = list(a.block_table)
    plan, _ = step(sched)  # a is now 9 tokens long: computed again, all 9 of them
    assert plan == {"a": 9} and a.cache_salt == "long" and a.num_computed_tokens == 9 and a.num_tokens == 10
    assert not set(a.block_table) & set(short_blocks) and sched.num_preemptions == 0
    assert sched.block_manager.match_prefix(list(range(1, 9)) + [5], None)[:2] == short_blocks[:2]
    assert sched.block_manager.match_prefix(a.token_ids, "long")[:2] == a.block_table[:2]
    assert step(sched)[0] == {"a": 1}  # and decodes on, long


def test_with_a_window_on_every_layer_blocks_behind_it_go_back_to_the_pool():
    """Window 6, blocks of 4: a sequence keeps about window / block + 2 blocks however long it grows; the released
    blocks stay findable by the prefix cache (hashed), and freeing it at the end frees the rest exactly once."""
    sched = Scheduler(BlockManager(64, 4), 8, 32, window=6)
    a = request("a", 9, max_tokens=30)
    sched.add(a)
    held = []
    while not a.finished:
        step(sched)
        held.append(sum(b >= 0 for b in a.block_table))
    assert 2 <= max(held) <= 3 and len(a.block_table) == 0  # 39 tokens would fill 10 blocks; freed at the end
    assert sched.block_manager.num_used_blocks == 0 and sched.block_manager.num_free_blocks == 64
    assert sched.block_manager.match_prefix(list(range(1, 10)))  # its first (released) blocks are still cached
