"""The stage walk: one token through the stages, stopping at the first exit whose confidence reaches
its threshold, with a cache policy for the layers the token skips. Greedy decoding (either KV rule)
and the speculative drafter are this walk.

Per token: stage k runs (on the rows the policy says), and if exit k is on its head reads the hidden
state and the cache of the layer it shares (the stage whose past mask the plan names for it); when its
confidence reaches the threshold the token is emitted there, otherwise the next stage runs; the last
stage's final head always decides. What the skipped stages get is the policy's:

- ``Recompute`` (the default KV rule): nothing at once; their rows wait. The next token that goes
  deeper carries the waiting rows through those layers in the same call (several new tokens at once,
  as a verification does), and an exit head carries the rows its shared layer still waits for. So
  every cache row a decision reads is the full model's own, exactly: a sequence whose early tokens
  all equal the full model's is the full model's sequence.
- ``Propagate`` (CALM's state propagation): at once, from the exited hidden state, by the state-fill
  graphs: the rows are approximations, and later tokens may change even when every early token was
  right. It is what the torch reference does with ``kv="propagate"``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from runtimes.bundle import GraphSpec, StageSpec
from runtimes.decoding.plan import DecodePlan
from runtimes.decoding.step import StepRunner
from runtimes.decoding.store import KVStore
from runtimes.errors import ConfigError
from runtimes.genconfig import KVRule

__all__ = ["StageWalk", "Recompute", "Propagate", "policy", "MAX_WAITING", "ALWAYS"]

# recomputation: an exit head carries the rows that wait for the next stage; past this many it is not
# asked (the token goes on and takes them along), so a long run of early tokens cannot make each
# head call longer without bound
MAX_WAITING = 16
ALWAYS = -math.inf  # a threshold every confidence reaches: the exit always fires (a drafter's)


class Propagate:
    """State propagation: a token's rows are in every stage when it is done (see the module)."""

    def __init__(self, plan: DecodePlan, store: KVStore, runner: StepRunner) -> None:
        self.plan, self.store, self.runner, self.row = plan, store, runner, runner.row

    def begin(self, length: int) -> None:
        """Every stage holds rows [0, length)."""

    def enter(self, k: int, graph: GraphSpec, at: int) -> int:
        """The first row stage ``k`` runs on for the token at row ``at``."""
        return at

    def ran(self, k: int, lo: int, at: int, has_exit: bool) -> None:
        """Stage ``k`` ran on rows [lo, at] and its keys and values are committed."""

    def head(self, k: int, graph: GraphSpec, at: int) -> int | None:
        """The first row exit ``k``'s head runs on, or None when it is not asked this token."""
        return at

    def exited(self, k: int, at: int) -> None:
        """The token left at exit ``k``: the state fills write every later stage's keys and values."""
        runner, fills = self.runner, self.plan.fills
        source = self.plan.hidden_out[k]
        for later in range(k + 1, len(self.plan.stages)):
            runner.run(fills[later], 1, source=source)
            runner.commit(fills[later], 1, at)

    def end(self, at: int) -> None:
        self.store.advance(self.row)


class Recompute:
    """Deferred, batched recomputation of skipped layers (see the module).

    ``pending[k]``: the first row whose keys and values stage ``k`` lacks. Rows that wait form a
    suffix at every stage (a token that reaches stage k carries all of stage k's waiting rows with
    it), and deeper stages wait for at least as many. Stage k's output hidden state of each row is
    kept (``store.hidden[k]``) until a deeper stage takes it; a row the next stage takes at once, in
    the buffer it was written to, is never stored. The masks of the stages a token ran are set when
    it is done (a graph reads its own new rows as new tokens, never from its past). ``max_waiting``:
    past this many waiting rows an exit is not asked (None: always asked, as a drafter's exit is)."""

    def __init__(self, plan: DecodePlan, store: KVStore, runner: StepRunner,
                 max_waiting: int | None = MAX_WAITING) -> None:
        self.plan, self.store, self.runner, self.row = plan, store, runner, runner.row
        self.max_waiting = math.inf if max_waiting is None else max_waiting
        stages = len(plan.stages)
        self.pending = [store.lengths[self.row]] * stages
        # per stage: does its hidden input share a buffer with the previous stage's output (one name)
        self._chained = [k > 0 and plan.hidden_in.get(st.segment.key) == plan.hidden_out.get(k - 1)
                         for k, st in enumerate(plan.stages)]
        self._out = plan.hidden_out
        self._lo = [0] * stages  # this token: the first row each stage ran on
        self._deep = 0  # this token: the deepest stage that ran
        self._owed = -1  # this token: a stage whose output rows are not stored yet (-1: none)
        self._fresh = False  # the 1-token hidden buffer holds the last stage's output for this token

    def begin(self, length: int) -> None:
        self.pending = [length] * len(self.plan.stages)

    def _store(self, at: int) -> None:
        """Store the owed stage's output rows (before anything reads them or writes over them)."""
        k, runner = self._owed, self.runner
        lo = self._lo[k]
        runner.copy(self.store.hidden[k, self.row, lo:at + 1], runner.shared(at + 1 - lo)[self._out[k]][0])
        self._owed = -1

    def enter(self, k: int, graph: GraphSpec, at: int) -> int:
        if not k:  # stage 0 reads the placed token only
            return at
        lo = self.pending[k]
        n = at + 1 - lo
        if n == 1 and self._fresh and self._chained[k]:  # the previous output is this input already, and
            self._owed = -1  # no later token reads that row of the store: this stage holds it now
            return lo
        if self._owed >= 0:
            self._store(at)
        self.runner.copy(self.runner.hidden_in(graph, n)[0], self.store.hidden[k - 1, self.row, lo:at + 1])
        return lo

    def ran(self, k: int, lo: int, at: int, has_exit: bool) -> None:
        self.pending[k] = at + 1
        self._lo[k], self._deep, self._fresh = lo, k, lo == at
        if has_exit:
            self._owed = k

    def head(self, k: int, graph: GraphSpec, at: int) -> int | None:
        lo = self.pending[self.plan.mask_of[graph.key]]  # the rows the layer it shares still waits for
        n = at + 1 - lo
        if n > self.max_waiting:
            return None
        if self._owed >= 0:
            self._store(at)
        self.runner.copy(self.runner.hidden_in(graph, n)[0], self.store.hidden[k, self.row, lo:at + 1])
        if n > 1:  # rows before the token's own now fill the hidden buffer the next stage may read
            self._fresh = False
        return lo

    def exited(self, k: int, at: int) -> None:
        """Nothing now: the stages after ``k`` wait for the next deep token."""

    def end(self, at: int) -> None:
        """Every stage that ran holds the rows it ran on: their masks, in as few writes as rows allow."""
        if self._owed >= 0:
            self._store(at)
        store, row, write, lo, deep = self.store, self.row, self.runner.write, self._lo, self._deep
        j = 1
        while j <= deep and lo[j] == at:
            j += 1
        write(store.masks[0:j, row, at:at + 1], 1)
        for k in range(j, deep + 1):
            write(store.masks[k, row, lo[k]:at + 1], 1)
        store.lengths[row] += 1  # within the store: the caller left room for every token it decodes
        store.positions[row] += 1


Policy = Recompute | Propagate


def policy(rule: KVRule, plan: DecodePlan, store: KVStore, runner: StepRunner,
           max_waiting: int | None = MAX_WAITING) -> Policy:
    """The cache policy of a KV rule."""
    if KVRule.parse(rule) is KVRule.PROPAGATE:
        return Propagate(plan, store, runner)
    return Recompute(plan, store, runner, max_waiting)


class StageWalk:
    """Tokens through ``stages`` (every stage by default; a drafter's: those up to its exit) at
    per-exit ``thresholds`` (None: off; ``ALWAYS``: fires). ``slack``: the highest confidence of an
    exit that was asked and did not fire; thresholds above it that keep the same exits on decide the
    same (calibration uses it)."""

    def __init__(self, runner: StepRunner, cache: Policy, thresholds: Sequence[float | None],
                 stages: Sequence[StageSpec] | None = None) -> None:
        self.runner, self.cache, self.store, self.row = runner, cache, runner.store, runner.row
        self.stages = tuple(runner.plan.stages if stages is None else stages)
        self.thresholds = list(thresholds)
        self.slack = 0.0
        # per stage, looked up once: (index, segment, its exit's head graph or None, the exit's threshold)
        self._walk = tuple((st.index, st.segment, None if st.exit is None else st.exit.graph,
                            None if st.exit is None else self.thresholds[st.index]) for st in self.stages)

    def step(self, token: int) -> tuple[int, Any, int]:
        """Decide the token after ``token`` (placed at the row's next position): the token, its
        confidence and the stage whose head decided it."""
        runner, cache = self.runner, self.cache
        at = self.store.lengths[self.row]
        runner.place([token])
        for k, seg, head, limit in self._walk:
            lo = cache.enter(k, seg, at) if k else at  # stage 0 runs on the placed token alone
            n = at + 1 - lo
            runner.run(seg, n, lo)
            runner.commit(seg, n, lo)
            cache.ran(k, lo, at, head is not None)
            if head is None:
                token, conf = runner.last(seg, n)
                break
            if limit is None:
                continue
            lo = cache.head(k, head, at)
            if lo is None:
                continue
            n = at + 1 - lo
            runner.run(head, n, lo)
            t, c = runner.last(head, n)
            if c < limit:
                if c > self.slack:
                    self.slack = float(c)
                continue
            token, conf = t, c
            cache.exited(k, at)
            break
        else:
            raise ConfigError("a stage walk ended without a decision: its last stage needs an exit that is on "
                              "or the final head")
        cache.end(at)
        return token, conf, k
