"""INT8 calibration data: the inputs every graph of a bundle sees on real samples.

Segment k of a chain does not take images or text but the hidden states of segment k - 1, so the
feeds for each graph come from running the fp32 chain on calibration samples (ONNX Runtime on
the CPU) and keeping what each graph reads.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from runtimes.backends.base import Backend

__all__ = ["FeedReader", "collect_feeds"]


class FeedReader:
    """ONNX Runtime's calibration-reader protocol over a list of feed dicts (one per batch)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def collect_feeds(backend: Backend, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, list[dict[str, np.ndarray]]]:
    """graph key -> the input feeds that graph receives, for every batch of model inputs."""
    bundle = backend.bundle
    feeds: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in bundle.graph_keys()}
    for inputs in batches:
        state = backend.start(inputs)
        for g in bundle.graphs:
            names = [t.name for t in g.inputs]
            if g.kind == "full":  # the baseline reads the model inputs, not the chain's state
                feeds[g.key].append({n: np.array(inputs[n]) for n in names})
                continue
            feeds[g.key].append({n: np.array(v) for n, v in backend.fetch(state, names).items()})
            backend.run(g.key, state)
    return feeds
