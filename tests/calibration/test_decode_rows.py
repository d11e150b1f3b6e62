"""The decode-row measurement calibration shares with analysis, on the tests' generative bundle."""

from __future__ import annotations

from calibration.decode_rows import call_ms, graph_times, token_mismatch
from runtimes import Runtime


def test_graph_times_use_the_public_parts(decoder_bundle) -> None:
    rt = Runtime.load(decoder_bundle.out)
    ms = graph_times(rt, verify_sizes=(3,), rounds=1, calls=1)
    assert {"step_0", "exit_0", "step_0@2", "full_step", "full_step@3", "fill_1"} <= set(ms)
    assert all(v > 0 for v in ms.values())
    assert call_ms(ms, "step_0@3") == (ms["step_0@2"] + ms["step_0@4"]) / 2


def test_token_mismatch_counts_missing_tokens() -> None:
    assert token_mismatch([1, 2, 3], [1, 2, 3]) == 0.0 and token_mismatch([1, 2], [1, 5, 3]) == 2 / 3
    assert token_mismatch([], []) == 0.0
