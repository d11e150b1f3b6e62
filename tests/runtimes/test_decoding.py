"""The decoding loops on a real generative bundle (ONNX Runtime): the monolithic baseline and lossless
self-speculation write exactly the text of greedy decoding with every exit off."""

from __future__ import annotations

import pytest

from runtimes.backends.onnxruntime import OrtBackend
from runtimes.decoding import DecodePlan, full_decode, greedy_decode, speculative_decode
from runtimes.errors import ConfigError, InputError


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


@pytest.mark.parametrize("draft_exit, draft_len", [(0, 1), (0, 3), (1, 2), (1, 5)])
def test_self_speculation_is_lossless(setup, draft_exit: int, draft_len: int) -> None:
    b, be, plan, data = setup
    drafted = corrected = 0
    for i, prompt in enumerate(data.prompts):
        full = full_decode(be, b, data.images[i:i + 1], prompt, 9, plan=plan)
        spec = speculative_decode(be, b, data.images[i:i + 1], prompt, 9, draft_exit, draft_len, plan=plan)
        assert spec.tokens == full.tokens and len(spec.exits) == len(spec.tokens)
        drafted += sum(e == draft_exit for e in spec.exits)
        corrected += sum(e == len(b.exits) for e in spec.exits[1:])
    assert drafted + corrected > 0
    if draft_exit == 1:  # this exit agrees often enough with the random full model for both paths to run
        assert drafted > 0 and corrected > 0  # accepted drafts, and the full model's corrections


def test_speculation_respects_max_new_and_bad_options(setup) -> None:
    b, be, plan, data = setup
    for n in (1, 2, 3):
        out = speculative_decode(be, b, data.images[:1], data.prompts[0], n, 0, 4, plan=plan)
        assert len(out.tokens) <= n and out.tokens == full_decode(be, b, data.images[:1], data.prompts[0], n).tokens[:n]
    with pytest.raises(ConfigError, match="draft"):
        speculative_decode(be, b, data.images[:1], data.prompts[0], 4, draft_exit=2)
    with pytest.raises(ConfigError, match="draft"):
        speculative_decode(be, b, data.images[:1], data.prompts[0], 4, draft_len=0)
    with pytest.raises(InputError, match="positions"):
        full_decode(be, b, data.images[:1], data.prompts[0], 64)


def test_runtime_generate_in_every_mode(decoder_bundle, micro_bundle) -> None:
    import numpy as np

    from runtimes import Runtime

    rt = Runtime.load(decoder_bundle.out)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    full = rt.generate(image, "w5 w6", max_new_tokens=6, mode="full")
    assert full.mode == "full" and 1 <= len(full.tokens) <= 6 and set(full.blocks) == {4}
    assert full.text == " ".join(f"w{t}" for t in full.tokens if t != 2) and full.calls == 1 + len(full.tokens)
    spec = rt.generate(image, "w5 w6", max_new_tokens=6, mode="speculative", draft_exit=1, draft_len=3)
    assert spec.tokens == full.tokens and spec.tokens_per_second > 0
    early = rt.generate(image, "w5 w6", max_new_tokens=6, thresholds=[0.0, 0.0])
    assert early.blocks[0] == 4 and set(early.blocks[1:]) <= {1} and early.mean_exit_block < 4
    with pytest.raises(ConfigError, match="mode"):
        rt.generate(image, mode="fast")
    for hostile in (1000, 0, -3, 2.5, "4", True):
        with pytest.raises(InputError, match="max_new_tokens"):
            rt.generate(image, max_new_tokens=hostile)
    with pytest.raises(InputError, match="prompt"):
        rt.generate(image, prompt=5)
    with pytest.raises(ConfigError, match="generative"):
        Runtime.load(micro_bundle.out).generate(image)
