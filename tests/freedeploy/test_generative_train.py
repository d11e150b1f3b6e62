"""Generative FREE training: the word-level tokenizer, teacher-forcing masks, a tiny BLIP-2 run whose
run dir reloads to the same model, the per-token objectives, and the CLI's routing and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import freedeploy.generative.train as gen_train
from freedeploy.cli import cli
from freedeploy.free import LossWeights
from freedeploy.generative.data import CaptionEncoder, SpecialIds, learn_tokenizer, tokenizer_ids
from freedeploy.generative.model import blip2_tiny_config
from freedeploy.generative.train import (TokenExitObjective, evaluate_generative, is_generative, load_generative_run,
                                         stage2_pool, train_generative)
from freedeploy.settings import TrainConfig
from runtimes.errors import CalibrationError, ConfigError, DataError
from runtimes.preprocess import ImageSpec

SMALL = (("num_hidden_layers", 4), ("ffn_dim", 256))  # a 4-layer decoder: the preset, slimmer


def _cfg(tmp: Path, name: str, **kw) -> TrainConfig:
    base = dict(model="blip2-tiny", data="captions-digits?limit=200", out=str(tmp / name), exits=(1, 2),
                finetune_epochs=1, exit_epochs=1, preset_config=SMALL, progress=False, device="cpu",
                labelled_fraction=0.5)
    base.update(kw)
    return TrainConfig(**base)


def test_tokenizer_specials_ids_and_round_trip() -> None:
    tok = learn_tokenizer(["A handwritten four .", "is it even ? yes , four is even ."])
    vocab = tok.get_vocab()
    assert [tok.token_to_id(t) for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")] == [0, 1, 2, 3]
    assert tok.token_to_id("[IMG]") == tok.get_vocab_size() - 1 == len(vocab) - 1
    assert blip2_tiny_config(tok.get_vocab_size()).image_token_index == tok.token_to_id("[IMG]")
    assert tokenizer_ids(tok) == SpecialIds(0, 1, 2, tok.get_vocab_size() - 1)
    # words by falling frequency: ".", "even", "four" and "is" twice, the rest once, ties alphabetical
    assert [tok.id_to_token(i) for i in range(4, 9)] == [".", "even", "four", "is", ","]
    ids = tok.encode("Is it EVEN ? yes, four", add_special_tokens=False).ids
    assert min(ids) >= 4 and 3 not in ids  # lowercased, punctuation split off: every word known
    assert tok.decode(ids) == "is it even ? yes , four"
    assert tok.encode("a purple four", add_special_tokens=False).ids[1] == 3  # unseen word: [UNK]


def _encoder(max_length: int = 32) -> CaptionEncoder:
    items = [(np.full((8, 8), 255, np.uint8), ""), (np.zeros((8, 8), np.uint8), "is it even ?")]
    targets = ["a handwritten four .", "yes , four is even ."]
    tok = learn_tokenizer([f"{p} {t}" for (_, p), t in zip(items, targets)])
    return CaptionEncoder(items, targets, ImageSpec(size=(32, 32)), tok, tokenizer_ids(tok), max_length)


def test_encoding_marks_exactly_the_target_predictions() -> None:
    enc = _encoder()
    tok = enc.tokenizer
    words = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    arrays = enc([0, 1])
    ids, mask, target, labels = (arrays[k] for k in ("input_ids", "attention_mask", "target_mask", "labels"))
    row0 = [1, *words("a handwritten four ."), 2]
    row1 = [1, *words("is it even ?"), *words("yes , four is even ."), 2]
    assert ids.shape == (2, len(row1)) and ids.dtype == np.int64
    assert ids[0].tolist() == row0 + [0] * (len(row1) - len(row0)) and ids[1].tolist() == row1
    assert mask.tolist() == [[1] * len(row0) + [0] * (len(row1) - len(row0)), [1] * len(row1)]
    # position i predicts ids[i + 1]: the loss covers the predictions of every target token and of EOS
    assert target[0].tolist() == [1] * (len(row0) - 1) + [0] * (len(row1) - len(row0) + 1)
    prompt = len(words("is it even ?"))
    assert target[1].tolist() == [0] * prompt + [1] * (len(row1) - 1 - prompt) + [0]
    for r, i in enumerate([0, 1]):
        assert labels[r][target[r] == 1].tolist() == enc.target_ids(i)
    assert enc.prompt_ids(0) == [1] and enc.prompt_ids(1) == [1, *words("is it even ?")]
    assert enc.target_ids(1)[-1] == 2
    px = arrays["pixel_values"]
    assert px.shape == (2, 3, 32, 32) and px.dtype == np.float32
    assert np.allclose(px[0], 1.0) and np.allclose(px[1], -1.0)  # gray -> 3 channels, normalised by 0.5 / 0.5
    assert enc.text([0], trim=False)["input_ids"].shape == (1, 32)
    with pytest.raises(DataError, match="row 1: .* 12 tokens, more than the maximum length 8"):
        _encoder(max_length=8)([1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """One tiny training run, and the trained model's logits on a fixed batch as it was saved."""
    tmp = tmp_path_factory.mktemp("gen")
    captured = {}
    save = gen_train._save

    def spy(directory, model, *args):
        captured["model_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        captured["logits"] = _logits(model)
        return save(directory, model, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen_train, "_save", spy)
        result = train_generative(_cfg(tmp, "run"))
    return result, captured


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20, (2, 6), generator=g)
    ids[:, 0] = 1
    return torch.randn(2, 3, 32, 32, generator=g), ids, torch.tensor([[1] * 6, [1] * 4 + [0] * 2])


@torch.no_grad()
def _logits(model):
    out = model.eval()(*_batch())
    return [out.logits, *out.exit_logits]


def test_run_dir_reloads_to_the_trained_model(run) -> None:
    result, captured = run
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == ["freedeploy.json", "metrics.json", "model.safetensors",
                                                     "splits.json", "tokenizer.json"]
    model, manifest = load_generative_run(out)
    assert manifest["task"] == "generate" and manifest["model_class"] == "Blip2ForConditionalGeneration"
    assert manifest["exits"] == [1, 2] and model.exits == (1, 2) and model.num_blocks == 4
    pre = manifest["preprocess"]
    assert (pre["bos_id"], pre["eos_id"], pre["pad_id"]) == (1, 2, 0) and pre["max_length"] == 32
    assert pre["image_token_id"] == manifest["hf_config"]["image_token_index"] == model.vocab_size - 1
    assert pre["image"]["size"] == [32, 32] and pre["tokenizer_file"] == "tokenizer.json"
    assert manifest["train_config"]["finetune_epochs"] == 1 and manifest["data"]["stage2_rows"] == \
        manifest["data"]["split_sizes"]["train"] > manifest["data"]["labelled"]
    for (name, t) in model.state_dict().items():
        assert torch.equal(t, captured["model_state"][name]), name
    for a, b in zip(_logits(model), captured["logits"]):
        assert torch.equal(a, b)
    assert not list(out.parent.glob(".*partial"))


def test_metrics_are_complete_and_reproducible(run) -> None:
    result, _ = run
    metrics = json.loads((result.out / "metrics.json").read_text())
    assert metrics["test"] == result.metrics["test"]
    for split in ("val", "test"):
        m = metrics[split]
        assert m["n"] > 0 and m["tokens"] > m["n"] and 0 < m["decoded"] <= m["n"]
        for key in ("final_token_accuracy", "final_exact_match"):
            assert 0.0 <= m[key] <= 1.0
        assert [e["block"] for e in m["exits"]] == [1, 2]
        for e in m["exits"]:
            for key in ("token_accuracy", "token_agreement", "sequence_agreement", "exact_match"):
                assert 0.0 <= e[key] <= 1.0
    # the reloaded run dir measures what training measured
    from analysis.data import load_dataset
    from freedeploy.generative.data import CaptionEncoder as Enc

    model, manifest = load_generative_run(result.out)
    from tokenizers import Tokenizer

    data = load_dataset(manifest["data"]["spec"])
    pre = manifest["preprocess"]
    enc = Enc(data.items, data.targets, ImageSpec(size=tuple(pre["image"]["size"])),
              Tokenizer.from_file(str(result.out / pre["tokenizer_file"])),
              SpecialIds(pre["pad_id"], pre["bos_id"], pre["eos_id"], pre["image_token_id"]), pre["max_length"])
    test = np.array(json.loads((result.out / "splits.json").read_text())["test"])
    assert evaluate_generative(model, enc, test, torch.device("cpu")) == metrics["test"]


def test_objectives_use_different_rows_and_terms(run) -> None:
    train_rows, labelled = np.arange(10), np.array([1, 4, 7])
    assert stage2_pool("ce", train_rows, labelled).tolist() == [1, 4, 7]
    assert stage2_pool("free", train_rows, labelled).tolist() == stage2_pool("ce+kd", train_rows, labelled).tolist() \
        == list(range(10))
    model, _ = load_generative_run(run[0].out)
    pixels, ids, mask = _batch()
    out = model(pixels, ids, mask)
    labels = torch.roll(ids, -1, dims=1)
    target = mask.clone()
    target[:, 0] = 0
    unlabelled = torch.zeros(2, dtype=torch.bool)
    for objective, weights in (("ce", LossWeights.for_objective("ce")), ("free", LossWeights.for_objective("free"))):
        obj = TokenExitObjective(model.heads, model.hidden_size, weights)
        loss, stats = obj("heads", out=out, labels=labels, target_mask=target, labelled=unlabelled, adv_weight=0.1)
        n_tokens = int(target.sum())
        assert stats["real"].shape == (n_tokens, model.hidden_size)
        assert [f.shape for f in stats["features"]] == [(n_tokens, model.hidden_size)] * 2
        if objective == "ce":  # no labelled row in the batch: nothing to learn from
            assert float(loss) == 0.0 and obj.disc is None
        else:  # distillation and the adversarial term need no labels
            assert float(loss.detach()) > 0.0 and obj.disc is not None
            loss.backward()
            assert all(p.grad is not None for p in model.heads[0].parameters() if p.requires_grad)
        labelled_loss, _ = obj("heads", out=out, labels=labels, target_mask=target,
                               labelled=torch.ones(2, dtype=torch.bool), adv_weight=0.0)
        assert float(labelled_loss.detach()) > 0.0


def _cli(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args)
    if isinstance(result.exception, SystemExit) or result.exception is None:
        return result.exit_code, result.stdout, result.stderr
    raise result.exception


def test_cli_routes_and_rejects_bad_combinations(tmp_path: Path) -> None:
    assert is_generative("blip2-tiny", "digits") and is_generative("vit-tiny", "captions-digits?limit=9")
    assert is_generative("x", "captions:/a/b.jsonl") and not is_generative("vilt-tiny", "vqa-digits")
    for args, says in ((["--model", "blip2-tiny", "--data", "digits"], "holds image data for classification"),
                       (["--model", "vit-tiny", "--data", "captions-digits"], "only a generative model")):
        code, out, err = _cli(["train", *args, "--out", str(tmp_path / "r"), "--no-progress"])
        assert code == ConfigError.exit_code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()
    code, out, err = _cli(["train", "--model", "blip2-tiny", "--data", "captions-digits?limit=60", "--exits", "2",
                           "--finetune-epochs", "1", "--exit-epochs", "1", "--objective", "ce", "--out",
                           str(tmp_path / "c"), "--json", "--no-progress", "--preset-config", "num_hidden_layers=3"])
    assert code == 0, err
    data = json.loads(out)
    assert data["config"]["exits"] == [2] and data["config"]["objective"] == "ce"
    assert [e["block"] for e in data["metrics"]["test"]["exits"]] == [2]
    manifest = json.loads((tmp_path / "c" / "freedeploy.json").read_text())
    assert manifest["data"]["stage2_rows"] == manifest["data"]["labelled"]


def test_export_writes_a_validated_generative_bundle_that_decodes_without_torch(run, tmp_path: Path) -> None:
    from freedeploy.generative.decode import greedy
    from tests.test_layout import run_blocked

    run_dir, bundle = run[0].out, tmp_path / "b"
    code, out, err = _cli(["export", str(run_dir), "--out", str(bundle), "--json"])
    assert code == 0, err
    d = json.loads(out)["validation"]["decoding"]
    assert d["sequences"] == json.loads((run_dir / "freedeploy.json").read_text())["data"]["split_sizes"]["test"]
    assert d["mismatched_exits_off"] == 0 and d["mismatched_exits_on"] == 0 and d["tokens_exits_off"] >= d["sequences"]
    code, text, _ = _cli(["inspect", str(bundle)])
    assert code == 0 and "generate" in text and "identical" in text
    pixels = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "px.npy", pixels)
    proc = run_blocked(f"""
        import json, numpy as np
        from runtimes.backends.onnxruntime import OrtBackend
        from runtimes.bundle import load_bundle
        from runtimes.decoding import greedy_decode
        b = load_bundle({str(bundle)!r})
        be = OrtBackend(b, "fp32")
        px = np.load({str(tmp_path / "px.npy")!r})
        outs = [greedy_decode(be, b, px, [1], 8, thresholds=t, kv="propagate")  # the reference's rule
                for t in ([None, None], [0.0, None], [0.0, 0.0])]
        from runtimes import Runtime
        rt = Runtime.load({str(bundle)!r})
        image = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
        texts = {{m: rt.generate(image, "is it even ?", mode=m, max_new_tokens=8) for m in ("full", "speculative", "exit")}}
        assert texts["speculative"].tokens == texts["full"].tokens, texts
        assert texts["exit"].tokens == texts["full"].tokens  # thresholds off: the whole chain
        assert texts["full"].text and set(texts["full"].blocks) == {{b.num_blocks}}
        assert "torch" not in sys.modules
        print(json.dumps([[o.tokens, o.blocks] for o in outs]))
    """)
    assert proc.returncode == 0, proc.stderr
    model, _ = load_generative_run(run_dir)
    blocks = [*model.exits, model.num_blocks]
    for (tokens, taken), thresholds in zip(json.loads(proc.stdout), ([None, None], [0.0, None], [0.0, 0.0])):
        ref = greedy(model, torch.from_numpy(pixels), [1], 8, 2, thresholds=thresholds)
        assert tokens == ref.tokens and taken == [blocks[e] for e in ref.exits]
    from PIL import Image

    Image.fromarray((np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)).save(tmp_path / "digit.png")
    code, out, err = _cli(["run", str(bundle), str(tmp_path / "digit.png"), str(tmp_path / "nope.png"),
                           "--prompt", "is it even ?", "--mode", "speculative", "--json"])
    rows = json.loads(out)
    assert code == 10 and rows[0]["mode"] == "speculative" and rows[0]["text"] and "error" in rows[1]
    assert len(rows[0]["words"]) == len(rows[0]["tokens"]) == len(rows[0]["blocks"]) == len(rows[0]["confidences"])
    code, _, err = _cli(["run", str(bundle), str(tmp_path / "digit.png"), "--question", "why ?"])
    assert code == 2 and "--prompt" in err
    # calibrate, eval and bench decode: certificate, three modes' quality, tokens per second
    code, out, err = _cli(["calibrate", str(bundle), "--max-disagreement", "0.5", "--rows", "30", "--json"])
    assert code == 0, err
    cert = json.loads(out)
    assert cert["level"] == "sequence" and cert["n"] == 30 and len(cert["thresholds"]) == 2
    assert cert["exit_selection"]["n_selection"] + cert["exit_selection"]["n_certification"] == 30
    assert cert["speculative"]["draft_block"] in (1, 2) and cert["speculative"]["draft_len"] >= 1
    assert json.loads((bundle / "bundle.json").read_text())["calibration"]["onnxruntime-fp32"]["level"] == "sequence"
    code, out, err = _cli(["eval", str(bundle), "--json"])
    assert code == 0, err
    m = json.loads(out)
    assert m["full"]["sequence_agreement"] == m["speculative"]["sequence_agreement"] == 1.0
    assert 0.0 <= m["exit"]["sequence_agreement"] <= 1.0 and "exact_match" in m["exit"] and m["certificate"]
    code, out, err = _cli(["bench", str(bundle), "--runs", "10", "--json"])
    assert code == 0, err
    r = json.loads(out)
    v = r["variants"]
    assert v["monolithic"]["identical_to_monolithic"] == 10 and v["chain, exits off"]["identical_to_monolithic"] == 10
    spec = next(k for k in v if k.startswith("speculative"))
    assert v[spec]["identical_to_monolithic"] == 10 and v["monolithic"]["calls_per_token"] == 1.0
    assert all(x["decode_tokens_per_s"] > 0 and x["measured_over_predicted"] > 0 for x in v.values())
    assert m["draft"]["block"] == cert["speculative"]["draft_block"]  # the measured default, from the certificate
    code, out, err = _cli(["bench", str(bundle), "--runs", "10", "--plot", str(tmp_path / "plots")])
    assert code == 0 and "decode tok/s" in out and "measured/predicted" in out, err
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"speedup_agreement.png", "exit_histogram.png"}
    for args, says in ((["calibrate", str(bundle), "--labels"], "classifiers"),
                       (["calibrate", str(bundle), "--rows", "0"], "--rows"),
                       (["calibrate", str(bundle), "--level", "word"], "--level"),
                       (["eval", str(bundle), "--data", "digits"], "image-to-text")):
        code, _, err = _cli(args)  # one clear line, not a traceback
        assert code in (2, DataError.exit_code) and says in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = _cli(["calibrate", str(bundle), "--rows", "3"])  # too few rows: said before decoding them all
    assert code == CalibrationError.exit_code and "even if none disagreed" in err.splitlines()[-1]
    assert "measuring" not in err and len(err.strip().splitlines()) == 2  # the rows' note, then the error
    code, _, err = _cli(["build", str(bundle), "--target", "trt-fp16"])
    assert code == 2 and "fp32" in err
    code, _, err = _cli(["export", str(run_dir), "--out", str(tmp_path / "c"), "--target", "trt-int8"])
    assert code == 2 and "int8" in err and not (tmp_path / "c").exists()
