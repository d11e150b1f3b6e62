"""The decoding modes on a real generative bundle (ONNX Runtime): the monolithic baseline and lossless
self-speculation write exactly the text of greedy decoding with every exit off; recomputation makes
every difference start at an exit; exits are named by block."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from runtimes.backends.onnxruntime import OrtBackend
from runtimes.decoding import DecodePlan, full_decode, greedy_decode, speculative_decode
from runtimes.errors import ConfigError, InputError
from runtimes.genconfig import KVRule


@pytest.fixture(scope="module")
def setup(decoder_bundle, decoder_data):
    b = decoder_bundle.bundle
    return b, OrtBackend(b, "fp32"), DecodePlan(b), decoder_data


def test_the_monolithic_step_decodes_what_the_chain_decodes_with_exits_off(setup) -> None:
    b, be, plan, data = setup
    for i, prompt in enumerate(data.prompts):
        chain = greedy_decode(be, b, data.images[i:i + 1], prompt, 8, thresholds=[None, None], plan=plan)
        full = full_decode(be, b, data.images[i:i + 1], prompt, 8, plan=plan)
        assert full.tokens == chain.tokens and full.calls == 2 + len(full.tokens) - 1


@pytest.mark.parametrize("draft_block, draft_len", [(1, 1), (1, 3), (2, 2), (2, 5)])
def test_self_speculation_is_lossless(setup, draft_block: int, draft_len: int) -> None:
    b, be, plan, data = setup
    drafted = corrected = 0
    for i, prompt in enumerate(data.prompts):
        full = full_decode(be, b, data.images[i:i + 1], prompt, 9, plan=plan)
        spec = speculative_decode(be, b, data.images[i:i + 1], prompt, 9, draft_block=draft_block,
                                  draft_len=draft_len, plan=plan)
        assert spec.tokens == full.tokens and len(spec.blocks) == len(spec.tokens)
        assert set(spec.blocks) <= {draft_block, b.num_blocks}
        drafted += sum(e == draft_block for e in spec.blocks)
        corrected += sum(e == b.num_blocks for e in spec.blocks[1:])
    assert drafted + corrected > 0
    if draft_block == 2:  # this exit agrees often enough with the random full model for both paths to run
        assert drafted > 0 and corrected > 0  # accepted drafts, and the full model's corrections


def test_the_deprecated_exit_index_still_drafts_and_warns(setup) -> None:
    b, be, plan, data = setup
    x, prompt = data.images[:1], data.prompts[0]
    want = speculative_decode(be, b, x, prompt, 9, draft_block=2, draft_len=3, plan=plan)
    with pytest.warns(DeprecationWarning, match="draft_block"):
        by_keyword = speculative_decode(be, b, x, prompt, 9, draft_exit=1, draft_len=3, plan=plan)
    with pytest.warns(DeprecationWarning, match="draft_block"):
        by_position = speculative_decode(be, b, x, prompt, 9, 1, 3, plan)
    assert (by_keyword.tokens, by_keyword.blocks) == (by_position.tokens, by_position.blocks) \
        == (want.tokens, want.blocks)
    with pytest.warns(DeprecationWarning, match="blocks"):
        assert want.exits == [{2: 1, 4: 2}[blk] for blk in want.blocks]  # the old index vocabulary
    with pytest.raises(ConfigError, match="not both"), pytest.warns(DeprecationWarning):
        speculative_decode(be, b, x, prompt, 9, draft_exit=1, draft_block=2)


def test_speculation_respects_max_new_and_bad_options(setup) -> None:
    b, be, plan, data = setup
    for n in (1, 2, 3):
        out = speculative_decode(be, b, data.images[:1], data.prompts[0], n, draft_block=1, draft_len=4, plan=plan)
        assert len(out.tokens) <= n and out.tokens == full_decode(be, b, data.images[:1], data.prompts[0], n).tokens[:n]
    for bad in (0, 3, 4, True, 1.0, "1"):  # a block without an exit (4: the final head's), or not a block
        with pytest.raises(ConfigError, match="draft block"):
            speculative_decode(be, b, data.images[:1], data.prompts[0], 4, draft_block=bad)
    with pytest.raises(ConfigError, match="draft"), pytest.warns(DeprecationWarning):
        speculative_decode(be, b, data.images[:1], data.prompts[0], 4, draft_exit=2)
    with pytest.raises(ConfigError, match="draft"):
        speculative_decode(be, b, data.images[:1], data.prompts[0], 4, draft_len=0)
    with pytest.raises(InputError, match="positions"):
        full_decode(be, b, data.images[:1], data.prompts[0], 64)


def test_runtime_generate_in_every_mode(decoder_bundle, micro_bundle) -> None:
    import numpy as np

    from runtimes import GenerationConfig, Generator, Mode, Runtime

    rt = Runtime.load(decoder_bundle.out)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    full = rt.generate(image, "w5 w6", max_new_tokens=6, mode="full")
    assert full.mode == "full" and 1 <= len(full.tokens) <= 6 and set(full.blocks) == {4}
    assert full.text == " ".join(f"w{t}" for t in full.tokens if t != 2) and full.calls == 1 + len(full.tokens)
    spec = rt.generate(image, "w5 w6", max_new_tokens=6, mode="speculative", draft_block=2, draft_len=3)
    assert spec.tokens == full.tokens and spec.tokens_per_second > 0
    with pytest.warns(DeprecationWarning, match="draft_exit"):  # the old spelling: the exit's index
        old = rt.generate(image, "w5 w6", max_new_tokens=6, mode="speculative", draft_exit=1, draft_len=3)
    assert old.tokens == spec.tokens and old.calls == spec.calls
    configured = rt.generate(image, "w5 w6", GenerationConfig(mode=Mode.SPECULATIVE, max_new_tokens=6,
                                                              draft_block=2, draft_len=3))
    assert configured.tokens == spec.tokens and configured.calls == spec.calls
    with pytest.raises(ConfigError, match="not both"):
        rt.generate(image, "w5 w6", GenerationConfig(), max_new_tokens=6)
    with pytest.raises(ConfigError, match="draft_block must be the block of an exit"):
        rt.generate(image, mode="speculative", draft_block=3)
    early = rt.generate(image, "w5 w6", max_new_tokens=6, thresholds=[0.0, 0.0])
    assert early.blocks[0] == 4 and set(early.blocks[1:]) <= {1} and early.mean_exit_block < 4
    with pytest.raises(ConfigError, match="mode"):
        rt.generate(image, mode="fast")
    for hostile in (1000, 0, -3, 2.5, "4", True):
        with pytest.raises(InputError, match="max_new_tokens"):
            rt.generate(image, max_new_tokens=hostile)
    with pytest.raises(InputError, match="prompt"):
        rt.generate(image, prompt=5)
    with pytest.raises(ConfigError, match="not Generator.load"):
        Generator.load(micro_bundle.out)


def _rows(b, data):
    from calibration.decode_rows import GenRows

    n = len(data.prompts)
    return GenRows("", "", np.arange(n), [data.images[i:i + 1] for i in range(n)], data.prompts, None, 6)


@pytest.fixture(scope="module")
def confidences(setup):
    """Every exit's confidences while decoding the fixture rows with every exit asked and none taken."""
    b, be, plan, data = setup
    from runtimes.decoding import greedy_decode as g

    out = [g(be, b, data.images[i:i + 1], p, 6, [2.0, 2.0], plan) for i, p in enumerate(data.prompts)]
    return max(o.slack for o in out)


def test_recomputation_makes_every_difference_start_at_an_exit(setup, confidences) -> None:
    """With recomputed keys and values every cache row is the full model's own, so the first token that
    differs from full-model greedy decoding was written by an exit, never by the final head."""
    b, be, plan, data = setup
    final = b.num_blocks
    checked = taken = 0
    for t in (0.0, 0.3 * confidences, 0.6 * confidences, 0.9 * confidences):
        for thresholds in ([t, None], [None, t], [t, t]):
            for i, prompt in enumerate(data.prompts):
                full = full_decode(be, b, data.images[i:i + 1], prompt, 6, plan=plan)
                got = greedy_decode(be, b, data.images[i:i + 1], prompt, 6, thresholds, plan=plan)
                taken += sum(e < final for e in got.blocks)
                diff = next((j for j, (x, y) in enumerate(zip(got.tokens, full.tokens)) if x != y), None)
                if diff is None and len(got.tokens) != len(full.tokens):
                    diff = min(len(got.tokens), len(full.tokens))
                if diff is not None:
                    checked += 1
                    assert diff < len(got.blocks) and got.blocks[diff] < final, (thresholds, got, full)
    assert checked > 0 and taken > 0


def test_both_kv_rules_agree_with_exits_off_and_differ_in_calls(setup) -> None:
    b, be, plan, data = setup
    for i, prompt in enumerate(data.prompts):
        x = data.images[i:i + 1]
        off = [greedy_decode(be, b, x, prompt, 6, [None, None], plan, kv=kv) for kv in (KVRule.RECOMPUTE, "propagate")]
        assert off[0].tokens == off[1].tokens == full_decode(be, b, x, prompt, 6, plan=plan).tokens
        early = [greedy_decode(be, b, x, prompt, 6, [0.0, 0.0], plan, kv=kv) for kv in ("recompute", "propagate")]
        assert early[0].tokens[:2] == early[1].tokens[:2]  # the first two tokens read no skipped layer
        assert "fill_1" not in early[0].graph_calls and early[1].graph_calls["fill_1"] == len(early[1].tokens) - 1


def test_the_sweep_reuses_decodes_exactly(setup) -> None:
    """Calibration decodes a row again only below its slack: what it keeps equals decoding at each point."""
    from calibration.generative import sweep
    from runtimes import Runtime

    b, be, plan, data = setup
    rt = Runtime.load(b.root)
    rows = _rows(b, data)
    from calibration.decode_rows import prefill_rows

    pre = prefill_rows(rt, rows)
    grid = (0.99, 0.5, 0.2, 0.1, 0.05, 0.0)
    got = sweep(rt, rows, pre, (0, 1), grid)
    p, _ = rt.decoding()
    for j, t in enumerate(grid):
        for i, prompt in enumerate(data.prompts):
            want = greedy_decode(rt.backend, b, rows.images[i], prompt, 6, [t, t], p)
            assert (got[j][i].tokens, got[j][i].blocks) == (want.tokens, want.blocks)


def test_bound_buffers_decode_what_plain_calls_decode(setup) -> None:
    """ONNX Runtime's binding on the loop's own buffers against the backend-neutral bind (start, run,
    fetch and a copy): the same tokens in every mode, at past lengths that cross a rebinding."""
    from runtimes.backends.base import Backend

    b, be, plan, data = setup

    class Plain(OrtBackend):
        def bind(self, graph, arrays):
            return Backend.bind(self, graph, arrays)

    plain = Plain(b, "fp32")
    for i, prompt in enumerate(data.prompts):
        x = data.images[i:i + 1]
        for fn in (lambda be_: greedy_decode(be_, b, x, prompt, 9, [0.0, None], plan),
                   lambda be_: greedy_decode(be_, b, x, prompt, 9, [None, None], plan),
                   lambda be_: speculative_decode(be_, b, x, prompt, 9, draft_block=2, draft_len=3, plan=plan)):
            a, c = fn(be), fn(plain)
            assert a.tokens == c.tokens and a.blocks == c.blocks


def test_an_exit_carries_at_most_max_waiting_rows(setup) -> None:
    b, be, plan, data = setup
    x, prompt = data.images[:1], data.prompts[0]
    free = greedy_decode(be, b, x, prompt, 9, [0.0, None], plan)
    capped = greedy_decode(be, b, x, prompt, 9, [0.0, None], plan, max_waiting=2)
    assert all(e == 1 for e in free.blocks[1:])  # every token leaves at the first exit (block 1)
    # past two waiting rows the exit is not asked: the token goes deep and takes them along
    deep = sum(n for key, n in capped.graph_calls.items() if key.split("@")[0] == "step_1")  # step_1@3: 3 rows
    assert any(e == b.num_blocks for e in capped.blocks[1:]) and deep > 0


def _plain_full_decode(be, b, image, prompt, max_new):
    """Greedy decoding with the monolithic step by plain graph calls on exact arrays: the whole cache
    (exactly as long as the sequence, nothing masked) fed to every call, nothing bound or preallocated."""
    plan = DecodePlan(b)
    d = plan.head
    state = be.start({plan.image_input: image.astype(np.float32)})
    be.run(d.encode.key, state)
    ids = np.array([prompt], np.int64)
    state.update({plan.prompt_ids: ids, plan.prompt_mask: np.ones_like(ids)})
    be.run(d.prefill.key, state)
    conf, pred = d.prefill.decision
    out = be.fetch(state, [t.name for t in d.prefill.outputs])
    cache = {layer: (out[k], out[v]) for layer, k, v in plan.new[d.prefill.key]}
    tokens, confs = [int(out[pred][0])], [float(out[conf][0])]
    full, past = b.full, {layer: (k, v) for layer, k, v in plan.past[b.full.key]}
    new = {layer: (k, v) for layer, k, v in plan.new[b.full.key]}
    conf, pred = full.decision
    while len(tokens) < max_new and tokens[-1] != d.eos_id:
        length = next(iter(cache.values()))[0].shape[1]
        feeds = {plan.token_ids: np.array([[tokens[-1]]], np.int64), plan.positions: np.array([[length]], np.int64),
                 plan.past_mask: np.ones((1, length), np.int64)}
        for layer, (k, v) in past.items():
            feeds[k], feeds[v] = cache[layer]
        state = be.start(feeds)
        be.run(full.key, state)
        got = be.fetch(state, [t.name for t in full.outputs])
        for layer, (k, v) in new.items():
            cache[layer] = tuple(np.concatenate([c, got[n]], axis=1) for c, n in zip(cache[layer], (k, v)))
        tokens.append(int(got[pred][0, -1]))
        confs.append(float(got[conf][0, -1]))
    return tokens, confs


def test_the_bound_loop_decodes_what_plain_calls_on_exact_arrays_decode(setup) -> None:
    """Independent of the loop's buffers, buckets and memory: the same tokens, confidences within float
    rounding (masked rows add exact zeros, but a longer past can change the order of the sums)."""
    b, be, plan, data = setup
    for i, prompt in enumerate(data.prompts):
        x = data.images[i:i + 1]
        tokens, confs = _plain_full_decode(be, b, x, prompt, 12)
        got = full_decode(be, b, x, prompt, 12, plan)
        assert got.tokens == tokens
        np.testing.assert_allclose(got.confidences, confs, rtol=1e-5, atol=1e-7)


def test_host_memory_moves_only_what_the_loop_asks(setup) -> None:
    """The loop reaches its buffers only through the decoding memory: per token of the monolithic step,
    two writes (token and position together, the mask entries), two copies (keys, values) and one read
    (the decision); the results are those of the backend's own memory."""
    from runtimes.backends.base import HostMemory

    b, be, plan, data = setup
    calls: list[str] = []

    class Recording(HostMemory):
        def copy(self, dst, src):
            calls.append("copy")
            super().copy(dst, src)

        def write(self, dst, values):
            calls.append("write")
            super().write(dst, values)

        def read(self, *srcs):
            calls.append("read")
            return super().read(*srcs)

    class Recorded(OrtBackend):
        def decode_memory(self):
            return Recording(self)

    rec = Recorded(b, "fp32")
    x, prompt = data.images[:1], data.prompts[0]
    want = full_decode(be, b, x, prompt, 9, plan)
    rec_plan = DecodePlan(b)
    full_decode(rec, b, x, prompt, 9, rec_plan)  # the session's buffers are made (and the prompt mask written)
    calls.clear()
    got = full_decode(rec, b, x, prompt, 9, rec_plan)
    steps = len(got.tokens) - 1
    assert (got.tokens, got.confidences) == (want.tokens, want.confidences)
    # prefill: the image, the prompt, the masks (cleared, then the prefix's rows), its decision
    assert Counter(calls) == {"write": 4 + 2 * steps, "copy": 2 * steps, "read": 1 + steps}
    for kv in ("recompute", "propagate"):
        a = greedy_decode(rec, b, x, prompt, 9, [0.04, 0.04], rec_plan, kv=kv)
        c = greedy_decode(be, b, x, prompt, 9, [0.04, 0.04], plan, kv=kv)
        assert (a.tokens, a.blocks, a.confidences) == (c.tokens, c.blocks, c.confidences)
