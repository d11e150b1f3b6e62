"""The decoding parts on their own: the KV store's rows (batch > 1), step runners on separate rows of
one store, and the wiring the plan reads from the bundle instead of naming conventions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from runtimes.backends.base import HostMemory
from runtimes.backends.onnxruntime import OrtBackend
from runtimes.decoding import DecodePlan, KVStore, StepRunner, full_decode, prefill
from runtimes.errors import ConfigError, InputError


class _Memory(HostMemory):
    def __init__(self) -> None:  # host arrays, nothing bound
        pass


def _store(batch: int = 3, capacity: int = 12) -> KVStore:
    return KVStore(_Memory(), layers=4, batch=batch, max_positions=capacity, width=8, stages=3)


def test_the_store_allocates_every_region_per_row() -> None:
    s = _store()
    assert s.keys.shape == s.values.shape == (4, 3, 12, 8) and s.masks.shape == (3, 3, 12)
    assert s.hidden.shape == (2, 3, 12, 8) and s.lengths == [0, 0, 0] and s.positions == [0, 0, 0]
    assert not s.masks.any()


def test_rows_have_their_own_lengths_positions_and_masks() -> None:
    s = _store()
    s.reset(0, 3)
    s.reset(1, 5, position=9)  # a row whose first cache row is not position 0
    s.advance(1, 2)
    s.advance(0, 1, stages=None)  # recomputation marks stage by stage
    s.mark(0, 1, 3, 4)
    s.mark(2, slice(0, 2), 0, 4)
    assert s.lengths == [4, 7, 0] and s.positions == [4, 11, 0]
    want = np.zeros((3, 3, 12), np.int64)
    want[:, 0, :3] = 1
    want[1, 0, 3] = 1
    want[:, 1, :7] = 1
    want[:2, 2, :4] = 1
    np.testing.assert_array_equal(s.masks, want)
    s.rewind(1, 4)  # rejected drafts: every stage of that row only
    want[:, 1, 4:] = 0
    np.testing.assert_array_equal(s.masks, want)
    assert s.lengths == [4, 4, 0] and s.positions == [4, 8, 0]
    s.reset(2, 0)
    want[:, 2] = 0
    np.testing.assert_array_equal(s.masks, want)


def test_a_row_snapshots_and_restores_alone() -> None:
    s = _store(batch=2)
    rng = np.random.default_rng(0)
    s.keys[...] = rng.normal(size=s.keys.shape)
    s.values[...] = rng.normal(size=s.values.shape)
    s.reset(1, 5)
    keys, values = s.snapshot(1)
    assert keys.shape == (4, 1, 5, 8)
    other = s.keys[:, 0].copy()
    s.keys[:, 1] = 0
    s.reset(1, 0)
    s.restore(1, keys, values)
    np.testing.assert_array_equal(s.keys[:, 1:2, :5], keys)
    np.testing.assert_array_equal(s.keys[:, 0], other)
    assert s.lengths == [0, 5] and s.masks[:, 1, :5].all() and not s.masks[:, 1, 5:].any()


def test_the_store_refuses_what_is_out_of_bounds() -> None:
    s = _store()
    for bad in (3, -1, True, 1.0):
        with pytest.raises(ConfigError, match="row"):
            s.reset(bad, 1)
    with pytest.raises(InputError, match="positions"):
        s.reset(0, 13)
    s.reset(0, 11)
    with pytest.raises(InputError, match="positions"):
        s.advance(0, 2)
    with pytest.raises(ConfigError, match="rewind"):
        s.rewind(0, 12)
    with pytest.raises(InputError, match="outside"):
        s.mark(0, 0, 10, 13)
    assert s.lengths[0] == 11 and s.masks[:, 0, :11].all() and not s.masks[:, 0, 11:].any()
    for name in ("batch", "max_positions", "width"):
        with pytest.raises(ConfigError, match=name):
            KVStore(_Memory(), **{"layers": 2, "batch": 1, "max_positions": 8, "width": 4, "stages": 2, name: 0})


@pytest.fixture(scope="module")
def setup(decoder_bundle, decoder_data):
    b = decoder_bundle.bundle
    return b, OrtBackend(b, "fp32"), DecodePlan(b), decoder_data


def test_runners_on_rows_of_one_store_decode_separate_sequences(setup) -> None:
    """Two samples, each in its own row of one batch-2 store, stepped token by token in turn with the
    monolithic step: each decodes what it decodes alone."""
    b, be, plan, data = setup
    store = KVStore(be.decode_memory(), plan.num_layers, 2, plan.max_positions, plan.width, len(plan.stages))
    runners = [StepRunner(plan, store.memory, store, row) for row in (0, 1)]
    samples = [(data.images[i:i + 1], data.prompts[i]) for i in (1, 3)]
    tokens = []
    for row, (x, prompt) in enumerate(samples):
        done = prefill(be, b, x, prompt, 9, plan)
        store.restore(row, done.keys, done.values)
        tokens.append([done.token])
    for _ in range(8):
        for row, runner in enumerate(runners):
            if tokens[row][-1] == plan.eos:
                continue
            at = store.lengths[row]
            runner.place([tokens[row][-1]])
            runner.run(plan.full)
            runner.commit(plan.full, 1, at)
            store.advance(row)
            tokens[row].append(runner.last(plan.full)[0])
    for row, (x, prompt) in enumerate(samples):
        assert tokens[row] == full_decode(be, b, x, prompt, 9, plan).tokens
    assert store.lengths[0] != store.lengths[1] or tokens[0] != tokens[1]


def test_the_plan_reads_which_mask_each_graph_reads(setup) -> None:
    b, _, plan, _ = setup
    want = {s.segment.key: s.index for s in b.stages}
    want.update({s.exit.graph.key: s.index + 1 for s in b.stages if s.exit is not None})
    want[b.full.key] = 0
    assert {k: plan.mask_of[k] for k in want} == want
    # a plan that names another stage is wired by it, not by a convention
    first = b.stages[0]
    inputs = tuple(replace(t, stage=0) if t.role == "sequence_mask" else t for t in first.exit.graph.inputs)
    moved = replace(first, exit=replace(first.exit, graph=replace(first.exit.graph, inputs=inputs)))
    assert DecodePlan(replace(b, stages=(moved, *b.stages[1:]))).mask_of[first.exit.graph.key] == 0

