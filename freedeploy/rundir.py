"""The run dir: what ``freedeploy train`` writes and ``freedeploy export`` reads.

::

    model.safetensors   backbone + exit heads (safetensors: no pickle anywhere)
    freedeploy.json     architecture (adapter, transformers config), exits, labels, preprocessing,
                        data spec and split fingerprints, the resolved training settings, versions
    splits.json         train / val / test / labelled indices into the data set
    metrics.json        per-exit accuracy, agreement, overthinking on the test split
    tokenizer.json      models that read text: the tokenizer the preprocessing uses

``load_run`` rebuilds the model from these files alone, without the training code path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.data import Dataset, load_dataset, split_digest
from freedeploy.architectures import build_from_config
from freedeploy.model import EarlyExitModel
from runtimes.atomic import Replaceable
from runtimes.errors import DataError, ModelError
from runtimes.preprocess import Spec, spec_from_dict

__all__ = ["RunInfo", "save_run", "load_run", "run_split", "RUN_FORMAT_VERSION"]

RUN_FORMAT_VERSION = 1
MANIFEST = "freedeploy.json"
RUN_DIR = Replaceable("a freedeploy run dir", MANIFEST, "format")  # what train --overwrite may replace
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class RunInfo:
    path: Path
    manifest: dict[str, Any]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    @property
    def preprocess(self) -> Spec:
        return spec_from_dict(self.manifest["preprocess"])

    @property
    def data(self) -> dict[str, Any]:
        return self.manifest["data"]

    def splits(self) -> dict[str, list[int]]:
        return json.loads((self.path / "splits.json").read_text())


def run_split(info: RunInfo, split: str, data_spec: str | None = None) -> tuple[Dataset, np.ndarray]:
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


def save_run(directory: Path, model: EarlyExitModel, manifest: dict[str, Any], splits: dict[str, Any],
             metrics: dict[str, Any]) -> None:
    """Write a complete run dir into ``directory`` (the caller makes it atomic)."""
    from safetensors.torch import save_model

    manifest = {
        "format": "freedeploy-run",
        "format_version": RUN_FORMAT_VERSION,
        "adapter": model.adapter.name,
        "model_class": model.adapter.model_class,
        "hf_config": model.hf.config.to_dict(),
        "exits": list(model.exits),
        "exit_init": model.exit_init,
        "exit_head": model.exit_head,
        **manifest,
    }
    save_model(model, os.fspath(directory / WEIGHTS))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    (directory / "splits.json").write_text(json.dumps({k: [int(i) for i in v] for k, v in splits.items()}) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise ModelError(f"{path} is not a freedeploy run dir: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file} is not valid JSON: {exc}") from None
    version = manifest.get("format_version")
    if manifest.get("format") != "freedeploy-run" or not isinstance(version, int):
        raise ModelError(f"{file} is not a freedeploy run manifest")
    if version > RUN_FORMAT_VERSION:
        raise ModelError(f"{file} has format version {version}; this freedeploy reads up to "
                         f"{RUN_FORMAT_VERSION}: upgrade freedeploy")
    return manifest


def load_run(path: str | os.PathLike) -> tuple[EarlyExitModel, RunInfo]:
    """Rebuild the trained early-exit model from a run dir; returns it in eval mode."""
    import transformers

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("task") == "generate":
        raise ModelError(f"{path} is a generative run dir (a decoder that writes text); this step takes a "
                         "classifier's run dir")
    cfg = dict(manifest["hf_config"])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf, adapter = build_from_config(config)
    if adapter.name != manifest["adapter"]:
        raise ModelError(f"{path}: config is a {adapter.name} model but the manifest says {manifest['adapter']}")
    model = EarlyExitModel(hf, adapter, manifest["exits"], exit_init=manifest.get("exit_init", "copy"),
                           exit_head=manifest.get("exit_head", "full-block"))
    load_weights(model, path)
    return model.eval(), RunInfo(path, manifest)


def load_weights(model: Any, path: Path) -> None:
    """A run dir's ``model.safetensors`` into ``model``; every tensor must match, both ways."""
    from safetensors.torch import load_model

    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{path} has no {WEIGHTS}")
    missing, unexpected = load_model(model, os.fspath(weights), strict=False)
    if missing or unexpected:
        raise ModelError(f"{weights} does not match the model in {MANIFEST}: missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
