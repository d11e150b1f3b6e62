"""The parity ladder's first rung: the segmented forward reproduces Hugging Face's forward exactly."""

from __future__ import annotations

import pytest
import torch

from freedeploy.adapters import ADAPTERS
from freedeploy.backbones import PRESETS, load_backbone
from freedeploy.model import EarlyExitModel, check_exits, segment_bounds
from runtimes.errors import ModelError

MICRO = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
# adapter name -> (preset, extra overrides); every registered adapter must appear here
ADAPTER_CASES = {
    "vit": ("vit-tiny", {}),
    "deit": ("deit-tiny", {}),
    "clip-vision": ("clip-tiny", {}),
    "bert": ("bert-tiny", {"vocab_size": 120, "num_hidden_layers": 5}),
    "vilt": ("vilt-tiny", {"vocab_size": 120}),
}


def test_every_registered_adapter_has_a_parity_case() -> None:
    assert set(ADAPTERS) == set(ADAPTER_CASES), "add a parity case for every new adapter"
    assert {p for p, _ in ADAPTER_CASES.values()} <= set(PRESETS)


def _inputs(modality: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}
    ids = torch.randint(5, 120, (4, 11), generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, 6:] = 0  # padded row
    mask[2, 1:] = 0  # only [CLS] is valid
    if modality == "image-text":  # a question and an image per row
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    return {"input_ids": ids, "attention_mask": mask}


def _raster_order(weights: torch.Tensor, n: int, replacement: bool = False, **kw) -> torch.Tensor:
    """ViLT draws a random order of the image patches (torch.multinomial without replacement);
    the identity draw makes its hidden states comparable token by token."""
    return _MULTINOMIAL(weights, n, replacement=replacement, **kw) if replacement else torch.arange(n)


_MULTINOMIAL = torch.multinomial


@pytest.mark.parametrize("name", sorted(ADAPTER_CASES))
def test_segmented_forward_matches_hf_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    preset, extra = ADAPTER_CASES[name]
    monkeypatch.setattr(torch, "multinomial", _raster_order)
    torch.manual_seed(0)
    bb = load_backbone(preset, ("a", "b", "c"), {**MICRO, **extra})
    exits = (1, 3, 4) if bb.adapter.num_blocks(bb.hf) > 5 else (2, 4)
    model = EarlyExitModel(bb.hf, bb.adapter, exits).eval()
    inputs = _inputs(bb.adapter.modality)
    with torch.no_grad():
        ref = bb.hf(**inputs, output_hidden_states=True)
        out = model(inputs)
    for e, hidden in zip(model.exits, out.exit_hidden):
        assert torch.equal(ref.hidden_states[e], hidden), f"{name}: exit {e} reads the wrong hidden state"
    assert torch.equal(ref.logits, out.logits)
    assert [tuple(x.shape) for x in out.exit_logits] == [(inputs[next(iter(inputs))].shape[0], 3)] * len(exits)


@pytest.mark.parametrize("name", sorted(ADAPTER_CASES))
def test_exit_head_starts_as_a_copy_of_the_next_block(name: str) -> None:
    preset, extra = ADAPTER_CASES[name]
    bb = load_backbone(preset, ("a", "b"), {**MICRO, **extra})
    model = EarlyExitModel(bb.hf, bb.adapter, (2,))
    blocks = bb.adapter.blocks(bb.hf)
    head = model.heads[0]
    for (n1, p1), (n2, p2) in zip(blocks[2].named_parameters(), head.block.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    cls = bb.adapter.classifier(bb.hf)
    for (n1, p1), (n2, p2) in zip(cls.named_parameters(), head.classifier.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    # the copy is a head of its own: the exit applied to block 2's output equals the backbone's next block
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(bb.adapter.call_block(blocks[2], x, None), bb.adapter.call_block(head.block, x, None))


def test_vilt_answers_do_not_depend_on_the_patch_order() -> None:
    """Hugging Face ViLT shuffles the image patches on every call; the adapter keeps raster order.
    Each patch carries its position embedding, so the answer is the same function of the inputs."""
    torch.manual_seed(2)
    bb = load_backbone("vilt-tiny", ("a", "b", "c"), {**MICRO, "vocab_size": 120})
    model = EarlyExitModel(bb.hf, bb.adapter, (2, 4)).eval()
    inputs = _inputs("image-text")
    with torch.no_grad():
        ours = model(inputs).logits
        for _ in range(3):  # three random patch orders
            torch.testing.assert_close(bb.hf(**inputs).logits, ours, atol=1e-5, rtol=0)


def test_random_exit_init_differs_from_the_backbone() -> None:
    bb = load_backbone("vit-tiny", ("a", "b"), MICRO)
    model = EarlyExitModel(bb.hf, bb.adapter, (2,), exit_init="random")
    assert not torch.equal(bb.adapter.blocks(bb.hf)[2].mlp.fc1.weight, model.heads[0].block.mlp.fc1.weight)


def test_segment_bounds_convention() -> None:
    assert segment_bounds((2, 4, 6), 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert segment_bounds((1,), 2) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("exits, words", [
    ((), "at least one exit"),
    ((4, 2), "strictly increasing"),
    ((2, 2), "strictly increasing"),
    ((0, 3), "out of range"),
    ((2, 8), "out of range"),
])
def test_bad_exits_are_model_errors(exits: tuple, words: str) -> None:
    with pytest.raises(ModelError, match=words):
        check_exits(exits, 8)


CLS_ADAPTERS = sorted(n for n, (p, _) in ADAPTER_CASES.items() if ADAPTERS[n].pooling == "cls")


@pytest.mark.parametrize("name", CLS_ADAPTERS)
def test_cls_query_head_equals_the_full_block_head(name: str) -> None:
    preset, extra = ADAPTER_CASES[name]
    torch.manual_seed(1)
    bb = load_backbone(preset, ("a", "b", "c"), {**MICRO, **extra})
    model = EarlyExitModel(bb.hf, bb.adapter, (1, 3)).eval()
    assert model.exit_head == "cls-query" and all(h.query_only for h in model.heads)
    inputs = _inputs(bb.adapter.modality)
    with torch.no_grad():
        cheap = model(inputs)
        model.set_exit_head("full-block")
        full = model(inputs)
    for a, b in zip(cheap.exit_logits, full.exit_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    for a, b in zip(cheap.exit_features, full.exit_features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cls_query_trains_like_the_full_block() -> None:
    """The two forms compute one function, so one training step moves the weights alike."""
    bb = load_backbone("vit-tiny", ("a", "b", "c"), MICRO)
    grads = {}
    for kind in ("cls-query", "full-block"):
        torch.manual_seed(0)
        model = EarlyExitModel(bb.hf, bb.adapter, (2,), exit_head=kind).eval()
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        hidden, mask = model.embed({"pixel_values": x})
        hidden = model.run_blocks(hidden, mask, 0, 2)
        loss = torch.nn.functional.cross_entropy(model.heads[0](hidden, mask)[0], torch.tensor([0, 1, 2, 0]))
        loss.backward()
        grads[kind] = {n: p.grad.clone() for n, p in model.heads[0].named_parameters() if p.grad is not None}
    # the key bias shifts every score of a row equally, so the softmax ignores it: cls-query never
    # touches it, and the full block's gradient for it is zero up to rounding
    for n in grads["full-block"].keys() - grads["cls-query"].keys():
        assert "k_proj.bias" in n and grads["full-block"][n].abs().max() < 1e-6
    for n in grads["cls-query"]:
        torch.testing.assert_close(grads["cls-query"][n], grads["full-block"][n], atol=1e-5, rtol=1e-4)


def test_mean_pooling_keeps_the_full_block() -> None:
    bb = load_backbone("clip-tiny", ("a", "b"), MICRO)
    assert EarlyExitModel(bb.hf, bb.adapter, (2,)).exit_head == "full-block"
    with pytest.raises(ModelError, match="full block"):
        EarlyExitModel(bb.hf, bb.adapter, (2,), exit_head="cls-query")
