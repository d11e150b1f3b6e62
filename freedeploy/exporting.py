"""Glue between a run dir and ``exporters.export_bundle``: load the model, encode the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from analysis.data import load_dataset, split_digest
from exporters.export import ExportConfig, ExportData, ExportResult, export_bundle
from freedeploy.inputs import TOKENIZER_FILE, Encoder
from freedeploy.rundir import RunInfo, load_run, read_manifest
from runtimes.atomic import check_target
from runtimes.bundle import BUNDLE_DIR
from runtimes.errors import ConfigError, DataError

__all__ = ["export_run", "run_split"]


def run_split(info: Any, split: str, data_spec: str | None = None) -> tuple[Any, np.ndarray]:
    """The data set and row indices of one split of a run, checked against the run's fingerprint."""
    data = load_dataset(data_spec or info.data["spec"])
    splits = info.splits()
    if split not in splits:
        raise DataError(f"run {info.path} has no split {split!r}; it has {sorted(splits)}")
    idx = np.asarray(splits[split], dtype=np.int64)
    if data_spec is None and split_digest(idx) != info.data["split_digests"].get(split, split_digest(idx)):
        raise DataError(f"the {split} split of {info.path} does not match its recorded fingerprint")
    if len(idx) and idx.max() >= len(data):
        raise DataError(f"data set {data.spec!r} has {len(data)} rows, fewer than run {info.path} was trained on")
    return data, idx


def export_run(run_dir: Path, out: Path, progress: Callable[[str], None] | None = None, **settings: Any) -> ExportResult:
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
                          progress: Callable[[str], None] | None = None) -> Any:
    """A generative run dir -> a generative bundle, validated on the whole test split."""
    from exporters.decoder_export import DecoderExportData, export_decoder_bundle
    from freedeploy.generative.data import CaptionEncoder
    from freedeploy.generative.decode import greedy
    from freedeploy.generative.train import load_generative_run

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

    def reference(pixels: Any, prompt: Any, n: int, thresholds: Any) -> Any:
        return greedy(model, pixels, prompt, n, special.eos, thresholds=thresholds)

    tokens = {"bos": special.bos, "eos": special.eos, "pad": special.pad, "vocab_size": model.vocab_size}
    provenance = {"export_settings": {k: v for k, v in vars(cfg).items()}, "source": {
        "model_class": manifest.get("model_class"), "exits": manifest.get("exits"), "data": manifest.get("data"),
        "source_model": manifest.get("source_model")}, "train_config": manifest.get("train_config", {}),
        "versions": manifest.get("versions", {})}
    return export_decoder_bundle(model, data=arrays, out=out, cfg=cfg, preprocess=enc.image_spec, tokens=tokens,
                                 tokenizer_file=run_dir / pre["tokenizer_file"], provenance=provenance,
                                 reference=reference, progress=progress, sources=(run_dir,))
