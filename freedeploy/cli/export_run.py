"""What ``freedeploy export`` does with a run dir: load the model and encode the data with the training
package, then hand the module and the arrays to ``exporters``. This is the one place where the
two meet: the training package never imports ``exporters``, and ``exporters`` never imports
``freedeploy`` (it receives the model as an object).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.decoder_export import DecoderExportData, DecoderExportResult, export_decoder_bundle
from exporters.export import ExportConfig, ExportData, ExportResult, export_bundle
from freedeploy.generative.data import CaptionEncoder
from freedeploy.generative.decode import greedy
from freedeploy.generative.train import load_generative_run
from freedeploy.inputs import TOKENIZER_FILE, Encoder
from freedeploy.rundir import RunInfo, load_run, read_manifest, run_split
from runtimes.atomic import check_target
from runtimes.bundle import BUNDLE_DIR
from runtimes.errors import ConfigError

__all__ = ["export_run"]


def export_run(run_dir: Path, out: Path, progress: Callable[[str], None] | None = None,
               **settings: Any) -> ExportResult | DecoderExportResult:
    """A run dir -> a validated bundle at ``out``; ``settings`` are ``ExportConfig``'s fields."""
    cfg = ExportConfig(**settings)
    check_target(Path(out), cfg.overwrite, BUNDLE_DIR, inputs=(run_dir,))  # before minutes of work
    if read_manifest(Path(run_dir)).get("task") == "generate":
        return export_generative_run(Path(run_dir), Path(out), cfg, progress)
    model, info = load_run(run_dir)
    data, test_idx = run_split(info, "test")
    _, train_idx = run_split(info, "train")
    calib_idx = np.sort(np.random.default_rng(0).permutation(train_idx)[:cfg.calib_samples])
    encode = Encoder(data, info.preprocess, info.path)
    arrays = ExportData(test=encode(test_idx), test_labels=data.labels[test_idx], calib=encode(calib_idx))
    run = {**info.manifest, "num_blocks": model.num_blocks}
    extra = {TOKENIZER_FILE: run_dir / TOKENIZER_FILE} if (run_dir / TOKENIZER_FILE).is_file() else {}
    return export_bundle(model, run, arrays, out, cfg, extra_files=extra, progress=progress, sources=(run_dir,))


def export_generative_run(run_dir: Path, out: Path, cfg: ExportConfig,
                          progress: Callable[[str], None] | None = None) -> DecoderExportResult:
    """A generative run dir -> a generative bundle, validated on the whole test split."""
    if cfg.head_weights != "fp32":
        raise ConfigError("--head-weights int8 is for classifiers; a decoder's exit heads stay fp32 for now")
    model, manifest = load_generative_run(run_dir)
    pre = manifest["preprocess"]
    data, test = run_split(RunInfo(run_dir, manifest), "test")
    enc = CaptionEncoder.for_run(run_dir, manifest, data)
    special = enc.special
    prompts = [enc.prompt_ids(int(i)) for i in test]
    positions = int(model.decoder.config.max_position_embeddings) - model.num_query_tokens
    max_new = min(int(pre["max_length"]), positions - max(len(p) for p in prompts))
    arrays = DecoderExportData(enc.pixels(test), prompts, [enc.target_ids(int(i)) for i in test], max_new)

    def reference(pixels: Any, prompt: Any, n: int, thresholds: Any, kv: Any) -> Any:
        return greedy(model, pixels, prompt, n, special.eos, thresholds=thresholds, kv=kv)

    tokens = {"bos": special.bos, "eos": special.eos, "pad": special.pad, "vocab_size": model.vocab_size}
    provenance = {"export_settings": {k: v for k, v in vars(cfg).items()}, "source": {
        "model_class": manifest.get("model_class"), "exits": manifest.get("exits"), "data": manifest.get("data"),
        "source_model": manifest.get("source_model")}, "train_config": manifest.get("train_config", {}),
        "versions": manifest.get("versions", {})}
    return export_decoder_bundle(model, data=arrays, out=out, cfg=cfg, preprocess=enc.image_spec, tokens=tokens,
                                 tokenizer_file=run_dir / pre["tokenizer_file"], provenance=provenance,
                                 reference=reference, progress=progress, sources=(run_dir,))
