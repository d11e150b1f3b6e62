"""The segmented BLIP-2 (OPT) decoder against Hugging Face: forward logits, incremental decoding with
an explicit cache, greedy decoding against ``generate``, and what an exit shares with the backbone."""

from __future__ import annotations

import pytest
import torch

from freedeploy.generative.decode import greedy
from freedeploy.generative.model import EarlyExitDecoder, blip2_tiny_config, position_ids, step_mask
from runtimes.errors import ModelError

V = 40


@pytest.fixture(scope="module")
def model() -> EarlyExitDecoder:
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(blip2_tiny_config(V, num_hidden_layers=4)).eval()
    return EarlyExitDecoder(hf, [1, 3]).eval()


def _hf_ids(model: EarlyExitDecoder, ids: torch.Tensor) -> torch.Tensor:
    q = model.num_query_tokens
    return torch.cat([torch.full((ids.shape[0], q), model.hf.config.image_token_index), ids], dim=1)


def test_forward_equals_hugging_face_with_left_padding(model: EarlyExitDecoder) -> None:
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, V - 1, (2, 7))
    ids[:, 0] = 1
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ours = model(px, ids, mask)
        full_mask = torch.cat([torch.ones(2, model.num_query_tokens, dtype=torch.long), mask], dim=1)
        ref = model.hf(pixel_values=px, input_ids=_hf_ids(model, ids), attention_mask=full_mask).logits
    ref = ref[:, model.num_query_tokens:]
    assert (ours.logits - ref)[mask.bool()].abs().max() < 1e-5
    assert len(ours.exit_logits) == 2 and ours.exit_logits[0].shape == ours.logits.shape
    assert ours.exit_features[0].shape == (2, 7, model.hidden_size)


def test_incremental_steps_equal_the_whole_sequence(model: EarlyExitDecoder) -> None:
    torch.manual_seed(2)
    px, ids = torch.randn(1, 3, 32, 32), torch.randint(4, V - 1, (1, 6))
    mask = torch.ones(1, model.num_query_tokens + 6, dtype=torch.long)
    with torch.no_grad():
        whole = model(px, ids, torch.ones(1, 6, dtype=torch.long), with_exits=False).logits
        prefix = model.image_prefix(px)
        p = model.num_query_tokens + 3
        h = model.embed(ids[:, :3], position_ids(mask[:, :p]), prefix)
        empty = h[:, :0]
        h, cache = model.run_layers(h, 0, model.num_blocks, [(empty, empty)] * model.num_blocks,
                                    step_mask(mask[:, :p], p))
        steps = [model.lm_head(model.final_norm(h))[:, -1]]
        for t, n in ((3, 1), (4, 2)):  # then one token, then the last two at once
            s = model.num_query_tokens + t + n
            h = model.embed(ids[:, t:t + n], position_ids(mask[:, :s])[:, -n:])
            h, new = model.run_layers(h, 0, model.num_blocks, cache, step_mask(mask[:, :s], n))
            cache = [(torch.cat([a, x], 1), torch.cat([b, y], 1)) for (a, b), (x, y) in zip(cache, new)]
            steps += list(model.lm_head(model.final_norm(h)).unbind(1))
    got = torch.stack(steps, dim=1)
    assert got.shape[1] == 4 and (got - whole[:, 2:]).abs().max() < 1e-5


def test_greedy_equals_hugging_face_generate(model: EarlyExitDecoder) -> None:
    torch.manual_seed(3)
    for length in (1, 4):
        px = torch.randn(1, 3, 32, 32)
        prompt = [1, *torch.randint(4, V - 1, (length - 1,)).tolist()]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.hf.generate(pixel_values=px, input_ids=_hf_ids(model, ids),
                                    attention_mask=torch.ones(1, model.num_query_tokens + length, dtype=torch.long),
                                    max_new_tokens=7, min_new_tokens=7, do_sample=False, num_beams=1)
        ours = greedy(model, px, prompt, 7, eos_id=-1)
        assert ours.tokens == ref[0, -7:].tolist() and ours.exits == [2] * 7


def test_an_untrained_exit_is_the_next_layer_then_the_final_head(model: EarlyExitDecoder) -> None:
    """An exit starts as a copy of the layer after it and shares that layer's keys and values: its
    logits equal running that one backbone layer and the final norm and head."""
    torch.manual_seed(4)
    fresh = EarlyExitDecoder(model.hf, [1, 3]).eval()
    px, ids = torch.randn(1, 3, 32, 32), torch.randint(4, V - 1, (1, 5))
    with torch.no_grad():
        out = fresh(px, ids, torch.ones(1, 5, dtype=torch.long))
        prefix = fresh.image_prefix(px)
        mask = torch.ones(1, fresh.num_query_tokens + 5, dtype=torch.long)
        h = fresh.embed(ids, position_ids(mask), prefix)
        add, empty = step_mask(mask, mask.shape[1]), h[:, :0]
        h, _ = fresh.run_layers(h, 0, 2, [(empty, empty)] * 2, add)  # through block 2 (exit at 1 reads block 1)
        ref = fresh.lm_head(fresh.final_norm(h))[:, fresh.num_query_tokens:]
    h1 = out.exit_logits[0]
    assert (h1 - ref).abs().max() < 1e-5
    shared = {id(p) for p in fresh.decoder.layers[1].self_attn.k_proj.parameters()}
    assert not shared & {id(p) for p in fresh.exit_parameters()}  # shared, not copied or trained


def test_exits_on_at_threshold_zero_take_the_first_exit_and_fill_the_state(model: EarlyExitDecoder) -> None:
    px = torch.randn(1, 3, 32, 32)
    every = greedy(model, px, [1], 6, eos_id=-1, thresholds=[0.0, 0.0])
    alone = greedy(model, px, [1], 6, eos_id=-1, only_exit=0)
    assert every.exits == [2, 0, 0, 0, 0, 0] and every.tokens == alone.tokens
    off = greedy(model, px, [1], 6, eos_id=-1, thresholds=[None, None])
    assert off.exits == [2] * 6


def test_a_model_without_an_opt_decoder_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="BLIP-2"):
        EarlyExitDecoder(torch.nn.Linear(2, 2), [1])


def test_exit_positions_are_checked(model: EarlyExitDecoder) -> None:
    with pytest.raises(ModelError, match="out of range"):
        EarlyExitDecoder(model.hf, [4])
