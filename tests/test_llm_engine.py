"""The LLM engine in-process: continuous batching equals decoding alone, preemption, cancellation,
sampling, stop conditions, detokenization and limits (backends/llm/)."""

from __future__ import annotations

import time

import pytest
import torch
import transformers  # noqa: F401 - dev extra: a missing dependency fails, it is not skipped

from backends.llm.detok import ByteDetokenizer, Detokenizer, StopText, byte_table
from backends.llm.engine import Engine, EngineOptions
from backends.llm.params import SamplingParams, parse
from server.core.errors import ErrorCode, ServingError
from tests import llm_helpers as h

PROMPTS = ["The server", "A cat sat on a mat in the sun by the door", "Hello", "x",
           "continuous batching lets a new request join", "zz top", "Rain fell on the roof all night."]


@pytest.fixture(scope="module")
def tok():
    return h.tokenizer()


@pytest.fixture(scope="module")
def model64(tok):
    return h.random_model(tok, torch.float64)


@pytest.fixture
def make_engine(model64, tok):
    engines = []

    def make(**options) -> Engine:
        engine = Engine(model64, tok, EngineOptions(**options), torch.device("cpu"))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding of one prompt alone, recomputing the whole sequence each step (no cache)."""
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_batched_greedy_equals_alone_with_joins_and_leaves(make_engine, model64, tok):
    engine = make_engine(max_num_seqs=4)
    runs = []
    for i, prompt in enumerate(PROMPTS):  # staggered: requests join while others decode, and leave early
        ids = tok(prompt)["input_ids"]
        col = h.Collector()
        engine.submit(str(i), ids, greedy(8 + 5 * (i % 3)), col)
        runs.append((ids, col))
        time.sleep(0.005 * (i % 2))
    for ids, col in runs:
        col.wait()
        assert col.final.finish_reason == "length"
        assert col.token_ids == reference(model64, ids, len(col.token_ids))
        assert len(col.token_ids) == col.final.num_output_tokens
    assert engine.used == 0 and not engine.running


def test_short_request_finishes_before_long_ones(make_engine, tok):
    engine = make_engine(max_num_seqs=8)
    longs = [h.Collector() for _ in range(3)]
    for i, col in enumerate(longs):
        engine.submit(f"long{i}", tok(PROMPTS[i])["input_ids"], greedy(150), col)
    while not all(c.outputs for c in longs):  # the long ones are decoding
        time.sleep(0.002)
    short = h.Collector()
    engine.submit("short", tok("Hello")["input_ids"], greedy(4), short)
    short.wait()
    assert not any(c.done.is_set() for c in longs), "the short request waited for the long ones"
    for col in longs:
        col.wait()
    assert short.final.timing.finished < min(c.final.timing.finished for c in longs)


def test_static_scheduling_waits_for_the_batch(model64, tok):
    engine = Engine(model64, tok, EngineOptions(max_num_seqs=8, scheduling="static"), torch.device("cpu"))
    runs = []
    for i, n in enumerate((40, 6)):  # the short member finishes first; its row runs on as padding
        ids = tok(PROMPTS[i])["input_ids"]
        runs.append((ids, n, h.Collector()))
        engine.submit(f"member{i}", ids, greedy(n), runs[-1][2])
    engine.start()  # both are queued: they form one batch
    try:
        _static_batch(engine, model64, tok, runs)
    finally:
        engine.stop()


def _static_batch(engine, model64, tok, runs) -> None:
    while not all(c.outputs for _, _, c in runs):
        time.sleep(0.002)
    late = h.Collector()
    late_ids = tok("Hello")["input_ids"]
    engine.submit("late", late_ids, greedy(2), late)
    late.wait()
    assert runs[1][2].wait().final.timing.finished < runs[0][2].wait().final.timing.finished
    assert late.final.timing.first_token > max(c.final.timing.finished for _, _, c in runs)
    for ids, n, col in runs + [(late_ids, 2, late)]:
        assert col.token_ids == reference(model64, ids, n)  # padding rows disturb nobody
    time.sleep(0.05)
    assert engine.used == 0 and not engine.running


def test_cancel_frees_cache_at_once(make_engine, tok):
    engine = make_engine(max_num_seqs=4)
    keep, drop = h.Collector(), h.Collector()
    engine.submit("keep", tok(PROMPTS[0])["input_ids"], greedy(200), keep)
    seq = engine.submit("drop", tok(PROMPTS[1])["input_ids"], greedy(200), drop)
    while len(drop.outputs) < 3:
        time.sleep(0.002)
    assert engine.metrics.running == 2
    engine.cancel(seq)
    drop.wait(10)
    assert drop.final.finish_reason == "abort" and drop.final.num_output_tokens >= 3
    time.sleep(0.05)
    assert engine.metrics.running == 1
    # its slot and tokens are gone: the only cache in use is the kept sequence's
    assert seq.cached == 0 and seq.slot == -1 and engine.slots == engine.running and seq not in engine.running
    assert not keep.done.is_set()
    engine.cancel(engine.running[0])
    keep.wait(10)
    time.sleep(0.05)
    assert engine.used == 0 and engine.metrics.kv_usage == 0 and engine.metrics.running == 0


def test_preemption_under_small_budget_loses_and_duplicates_nothing(make_engine, model64, tok):
    engine = make_engine(max_num_seqs=4, kv_cache_tokens=80)
    runs = []
    for i, prompt in enumerate(PROMPTS[:6]):
        ids = tok(prompt)["input_ids"]
        col = h.Collector()
        engine.submit(str(i), ids, greedy(40), col)
        runs.append((ids, col))
    for ids, col in runs:
        col.wait()
        steps = [o.token_ids for o in col.outputs]
        assert all(len(s) == 1 for s in steps)  # one token per delivered step: nothing re-sent
        assert col.token_ids == reference(model64, ids, 40)
    assert engine.metrics.preemptions > 0
    assert sum(c.final.preemptions for _, c in runs) == engine.metrics.preemptions
    assert engine.used == 0


def test_request_that_cannot_fit_is_rejected_naming_the_limits(make_engine, tok):
    engine = make_engine(max_num_seqs=2, kv_cache_tokens=100)
    with pytest.raises(ServingError) as err:
        engine.submit("big", tok("Hello")["input_ids"], greedy(120), h.Collector())
    assert err.value.code == ErrorCode.INVALID_ARGUMENT
    assert "max_tokens (120)" in str(err.value) and "100 tokens" in str(err.value)
    with pytest.raises(ServingError, match="max_model_len 256"):
        make_engine(max_num_seqs=2).submit("big", list(range(200)), greedy(100), h.Collector())


def test_seeded_sampling_is_reproducible_in_a_batch(make_engine, tok):
    engine = make_engine(max_num_seqs=4)
    ids = tok("The cat")["input_ids"]
    params = dict(temperature=1.0, max_tokens=20, ignore_eos=True)
    cols = [h.Collector() for _ in range(4)]
    engine.submit("a", ids, SamplingParams(seed=7, **params), cols[0])
    engine.submit("b", ids, SamplingParams(seed=7, top_k=50, top_p=0.9, **params), cols[1])
    engine.submit("c", ids, SamplingParams(seed=8, **params), cols[2])
    cols[0].wait()
    engine.submit("d", ids, SamplingParams(seed=7, **params), cols[3])  # alone this time
    for c in cols:
        c.wait()
    assert cols[0].token_ids == cols[3].token_ids
    assert cols[0].token_ids != cols[2].token_ids
    vocab = len(tok)
    assert all(0 <= t < vocab for c in cols for t in c.token_ids)


def test_top_k_one_and_tiny_top_p_are_greedy(make_engine, model64, tok):
    engine = make_engine(max_num_seqs=4)
    ids = tok(PROMPTS[1])["input_ids"]
    a, b = h.Collector(), h.Collector()
    engine.submit("a", ids, SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True, seed=1), a)
    engine.submit("b", ids, SamplingParams(temperature=0.8, top_p=1e-9, max_tokens=12, ignore_eos=True), b)
    expected = reference(model64, ids, 12)
    assert a.wait().token_ids == expected and b.wait().token_ids == expected


def test_stop_token_ids_stop_strings_and_eos(make_engine, model64, tok):
    engine = make_engine(max_num_seqs=4)
    ids = tok(PROMPTS[0])["input_ids"]
    free = h.Collector()
    engine.submit("free", ids, greedy(30), free)
    tokens = free.wait().token_ids
    # stop token id: generation ends at its first occurrence, the token is counted but not shown
    stop_id = tokens[5]
    col = h.Collector()
    engine.submit("s", ids, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id],
                                           ignore_eos=True), col)
    col.wait()
    assert col.token_ids == tokens[:tokens.index(stop_id) + 1] and col.final.finish_reason == "stop"
    # stop string: the text ends right before it, and nothing after it was ever streamed
    text = free.text
    needle = text[len(text) // 2:len(text) // 2 + 3]
    col = h.Collector()
    engine.submit("t", ids, greedy(30, stop=[needle]), col)
    col.wait()
    assert col.final.finish_reason == "stop" and col.text == text[:text.index(needle)]
    # EOS ends generation unless ignore_eos (here the 4th greedy token plays the model's EOS)
    eos_engine = make_engine(max_num_seqs=2)
    eos_engine.eos_ids = {tokens[3]}
    stopped, ignored = h.Collector(), h.Collector()
    eos_engine.submit("e", ids, SamplingParams(temperature=0, max_tokens=30), stopped)
    eos_engine.submit("i", ids, greedy(30), ignored)
    assert stopped.wait().final.finish_reason == "stop"
    assert stopped.token_ids == tokens[:tokens.index(tokens[3]) + 1]
    assert ignored.wait().final.finish_reason == "length" and ignored.token_ids == tokens


def test_logprobs_are_reported(make_engine, tok):
    engine = make_engine(max_num_seqs=2)
    col = h.Collector()
    engine.submit("l", tok("Hello")["input_ids"], greedy(3, logprobs=2), col)
    col.wait()
    lps = [lp for o in col.outputs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == col.token_ids
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id  # greedy: the best


@pytest.mark.parametrize("kind", ["window", "bytes"])
def test_detokenizer_deltas_are_whole_characters(tok, kind):
    text = "héllo ☃ wörld — naïve 日本語 ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # bytes of one character spread over several tokens
    detok = Detokenizer(tok, [tok.eos_token_id]) if kind == "window" else ByteDetokenizer(byte_table(tok))
    deltas = [detok.add(t) for t in ids + [tok.eos_token_id]]  # special tokens add no text
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # something was held back mid-character


def test_byte_table_decodes_like_the_tokenizer(tok):
    import random

    table = byte_table(tok)
    assert table is not None and len(table) == len(tok)
    rng = random.Random(0)
    for _ in range(50):  # random id runs, invalid UTF-8 included: same text as decode()
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]
        detok = ByteDetokenizer(table)
        streamed = "".join(detok.add(t) for t in ids) + detok.flush()
        assert streamed == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_stop_text_holds_back_possible_stop_prefixes():
    st = StopText(["STOP"])
    assert st.add("abc S") == ("abc ", False)  # "S" might start "STOP"
    assert st.add("T") == ("", False)
    assert st.add("x") == ("STx", False)  # not a stop after all: released
    assert st.add(" ST") == (" ", False)
    assert st.add("OP and more") == ("", True)
    assert st.text == "abc STx "
    inclusive = StopText(["</s>"], include_stop=True)
    assert inclusive.add("a</s>b") == ("a</s>", True)


@pytest.mark.parametrize("raw, message", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stop": [1]}, "stop"),
    ({"seed": -3}, "seed"),
    ({"n": 2}, "'n' is not supported"),
    ({"frobnicate": 1}, "unknown sampling parameter 'frobnicate'"),
    ({"logprobs": 99}, "logprobs"),
])
def test_bad_sampling_parameters_name_the_problem(raw, message):
    with pytest.raises(ServingError, match=message) as err:
        parse(raw)
    assert err.value.code == ErrorCode.INVALID_ARGUMENT


def test_parse_accepts_vllm_names():
    p = parse({"temperature": 0, "top_k": -1, "max_tokens": 7.0, "stop": "x", "seed": 3, "n": 1,
               "ignore_eos": True, "logprobs": True})
    assert p.greedy and p.top_k == 0 and p.max_tokens == 7 and p.stop == ["x"] and p.logprobs == 0
