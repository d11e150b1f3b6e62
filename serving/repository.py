"""A Triton model repository for a plain ``tritonserver``: NGC containers, Jetson, DeepStream's
``nvinferserver``; no PyTriton, no freedeploy installed on the server.

``write_repository(bundle_dir, out)`` adds two models to the repository ``out`` (other models
already there are left alone: a repository holds many)::

    NAME/config.pbtxt                   backend "python", dynamic batching, the raw inputs
    NAME/1/model.py                     serving/triton_model.py
    NAME/1/bundle/                      a copy of the bundle, checked after copying
    NAME/1/runtimes/                    the runtime's own sources, vendored
    NAME/1/serving/protocol.py          the tensors model.py takes and answers, vendored (nothing else
                                        of ``serving``: no server, no client)
    NAME/freedeploy-model.json          marks the model as ours: only such a model is replaced
    NAME_tensors/config.pbtxt           the bundle's preprocessed model inputs; same bundle copy
    NAME_tensors/1/model.py
    NAME_tensors/freedeploy-model.json

The inputs and outputs are ``serving.protocol``'s, as ``freedeploy serve`` answers them, so
one client talks to both. The vendored ``runtimes`` and protocol make the server run the versions the
repository was written with, whatever else its Python holds. That Python (the one Triton's
Python-backend stub embeds: in an NGC container the system Python; elsewhere the first ``python3``
on PATH decides whose site-packages it reads, so a virtual environment's ``bin`` goes first on
PATH: the stub ignores PYTHONPATH) still needs numpy and onnxruntime, Pillow for image bundles and
tokenizers for text bundles, e.g. ``pip install numpy pillow onnxruntime tokenizers`` in the
container; ``tensorrt`` and ``cuda-python`` where the bundle's TensorRT engines should run
(backend ``auto`` falls back to ONNX Runtime otherwise). Each model's ``parameters`` (mode, bundle,
backend, early_exit, thresholds) may be edited before the server starts.

Triton tries to load every directory of a repository, hidden ones too: a write killed outright
(SIGKILL, power loss; Ctrl-C and SIGTERM clean up) leaves a ``.NAME.<host>-<pid>.*.partial``
directory that stops ``tritonserver`` from starting until the next write of that model removes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import runtimes
from runtimes.atomic import LOCK_FILE, Replaceable, atomic_directory, check_target
from runtimes.backends.base import device_form
from runtimes.errors import BundleError, ConfigError
from runtimes.thresholds import parse_thresholds
from serving.protocol import DEFAULT_QUEUE_DELAY_US, OUTPUTS, check_model_name, inputs_for, model_name, model_names

__all__ = ["write_repository", "config_text", "vendor", "MODEL_MARKER", "MODEL_DIR", "VERSION", "REQUIREMENTS",
           "VENDORED_PROTOCOL"]

MODEL_MARKER = "freedeploy-model.json"
MODEL_DIR = Replaceable("a Triton model written by freedeploy", MODEL_MARKER, "triton_model")
VERSION = "1"  # the model version directory
_TEMPORARY = re.compile(r"^\..+\.(tmp|partial|old)$")  # runtimes.atomic's temporary names
VENDORED_PROTOCOL = "serving/protocol.py"  # the one module of this package that model.py imports
_VENDORED_INIT = '"""What a freedeploy Triton model vendors of ``serving``: the protocol, nothing else."""\n'
# what the server's Python needs besides the vendored runtime, by the bundle's preprocessing kind
REQUIREMENTS = {"image": ("numpy", "onnxruntime", "pillow"), "text": ("numpy", "onnxruntime", "tokenizers"),
                "image-text": ("numpy", "onnxruntime", "pillow", "tokenizers")}


def _check(name: str, max_batch: int, queue_delay_us: int, instances: int, backend: str) -> None:
    check_model_name(name)
    for what, value, low in (("max batch", max_batch, 1), ("queue delay", queue_delay_us, 0),
                             ("instances", instances, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{what} must be an integer of at least {low}, got {value!r}")
    from runtimes.backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")


def _checked_thresholds(bundle: Any, thresholds: Sequence[float | None] | None) -> list[float | None] | None:
    """The one threshold rule (``runtimes.thresholds``), checked before the repository is written."""
    return None if thresholds is None else parse_thresholds(thresholds, len(bundle.exits), f"bundle {bundle.name}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(port: Any) -> str:
    dims = ", ".join(str(d) for d in port.shape)
    return f"  {{\n    name: {_quote(port.name)}\n    data_type: {port.config_type}\n    dims: [ {dims} ]\n  }}"


def config_text(name: str, inputs: Sequence[Any], max_batch: int, queue_delay_us: int | None, instances: int,
                parameters: dict[str, str], note: str) -> str:
    """The model's config.pbtxt (protobuf text format); ``queue_delay_us`` None: no dynamic batching."""
    params = "\n".join(f"parameters: {{\n  key: {_quote(k)}\n  value: {{ string_value: {_quote(v)} }}\n}}"
                       for k, v in parameters.items())
    return (f"# {note}\n"
            f"name: {_quote(name)}\nbackend: \"python\"\nmax_batch_size: {max_batch}\n"
            "input [\n" + ",\n".join(_tensor(p) for p in inputs) + "\n]\n"
            "output [\n" + ",\n".join(_tensor(p) for p in OUTPUTS) + "\n]\n"
            + ("" if queue_delay_us is None else
               f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n") +
            f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: {instances}\n  }}\n]\n"
            f"{params}\n")


def _skip(name: str) -> bool:
    """What is not copied: caches, the writer lock, temporaries of a write in progress or killed."""
    return name in ("__pycache__", LOCK_FILE) or name.endswith(".pyc") or bool(_TEMPORARY.match(name))


def _copy_tree(src: Path, dst: Path) -> int:
    """Copy the files under ``src`` (links followed) with new permissions (the user's umask, as a
    fresh file gets); returns the bytes copied."""
    size = 0
    dst.mkdir()
    for entry in sorted(src.iterdir()):
        if _skip(entry.name):
            continue
        if entry.is_dir():
            size += _copy_tree(entry, dst / entry.name)
        elif entry.is_file():
            shutil.copyfile(entry, dst / entry.name)
            size += (dst / entry.name).stat().st_size
    return size


def vendor(into: Path) -> None:
    """What ``model.py`` imports, copied under ``into`` (the directory it puts first on ``sys.path``):
    the ``runtimes`` package whole, and of ``serving`` only the protocol."""
    _copy_tree(Path(runtimes.__file__).resolve().parent, into / "runtimes")
    (into / "serving").mkdir()
    (into / "serving" / "__init__.py").write_text(_VENDORED_INIT, encoding="utf-8")
    shutil.copyfile(Path(__file__).with_name("protocol.py"), into / VENDORED_PROTOCOL)


def _marker(mode: str, bundle: Any, name: str) -> str:
    from runtimes.bundle import MANIFEST, sha256_file

    return json.dumps({"triton_model": {"mode": mode, "name": name, "bundle": bundle.name,
                                        "bundle_manifest_sha256": sha256_file(Path(bundle.root) / MANIFEST)}},
                      indent=2) + "\n"


def write_repository(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None,
                     max_batch: int | None = None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instances: int = 1,
                     early_exit: bool = True, overwrite: bool = False,
                     thresholds: Sequence[float | None] | None = None, backend: str = "auto",
                     batching: bool = True, device: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """Add the bundle's two models (raw inputs, model inputs) to the Triton model repository
    ``out_dir``; returns a summary. Both model directories appear together, complete, or not at
    all; ``overwrite`` replaces only models this function wrote. ``thresholds`` None: the bundle's
    own (its certificate for the server's backend, else its exported thresholds)."""
    from runtimes.bundle import load_bundle

    bundle_dir, out = Path(bundle_dir), Path(out_dir)
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise BundleError(" ".join(str(exc).split())) from None
    ports = {mode: inputs_for(bundle, mode) for mode in ("raw", "tensors")}  # refuses generative bundles
    name = model_name(bundle.name) if name is None else name
    max_batch = bundle.batch.max if max_batch is None else max_batch
    _check(name, max_batch, queue_delay_us, instances, backend)
    if device is not None and device_form(device) is None:
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N: a GPU index), got {device!r}")
    thresholds = _checked_thresholds(bundle, thresholds)
    names = model_names(name)
    targets = {mode: out / names[mode] for mode in ("raw", "tensors")}
    for target in targets.values():  # both refusals before anything is written
        check_target(target, overwrite, MODEL_DIR, inputs=[bundle_dir])
    raw_home = f"../{names['raw']}/{VERSION}"  # from a model's directory to the raw model's version dir
    common = {"backend": backend, "device": device or "", "precision": precision or "",
              "early_exit": "true" if early_exit else "false",
              "thresholds": "" if thresholds is None else json.dumps(thresholds)}
    template = Path(__file__).with_name("triton_model.py")
    note = f"written by freedeploy triton-repo from bundle {bundle.name!r}"
    # the tensors model commits last: it reads the raw model's bundle copy
    with (atomic_directory(targets["tensors"], overwrite, MODEL_DIR, [bundle_dir]) as tensors_tmp,
          atomic_directory(targets["raw"], overwrite, MODEL_DIR, [bundle_dir]) as raw_tmp):
        for mode, tmp in (("raw", raw_tmp), ("tensors", tensors_tmp)):
            params = {"mode": mode, "bundle": f"{raw_home}/bundle", "runtimes": raw_home, **common}
            (tmp / "config.pbtxt").write_text(config_text(names[mode], ports[mode], max_batch,
                                                          queue_delay_us if batching else None, instances, params,
                                                          note), encoding="utf-8")
            (tmp / VERSION).mkdir()
            shutil.copyfile(template, tmp / VERSION / "model.py")
            (tmp / MODEL_MARKER).write_text(_marker(mode, bundle, names[mode]), encoding="utf-8")
        size = _copy_tree(bundle_dir, raw_tmp / VERSION / "bundle")
        vendor(raw_tmp / VERSION)
        try:  # the copy is what the server will load: check every file's checksum now
            load_bundle(raw_tmp / VERSION / "bundle")
        except BundleError as exc:
            raise BundleError(f"the copy of {bundle_dir} does not check out (was it changed while copying?): "
                              + " ".join(str(exc).split())) from None
    kind = bundle.preprocess.kind
    return {"repository": str(out), "bundle": bundle.name, "bundle_dir": str(bundle_dir),
            "models": {mode: str(targets[mode]) for mode in ("raw", "tensors")}, "names": dict(names),
            "bundle_copy": str(targets["raw"] / VERSION / "bundle"), "bundle_bytes": size,
            "max_batch": max_batch, "queue_delay_us": queue_delay_us if batching else None, "batching": batching,
            "instances": instances,
            "early_exit": early_exit, "thresholds": thresholds, "backend": backend,
            "inputs": {mode: [{"name": p.name, "datatype": p.datatype, "shape": list(p.shape)} for p in ports[mode]]
                       for mode in ports},
            "outputs": [{"name": p.name, "datatype": p.datatype, "shape": list(p.shape)} for p in OUTPUTS],
            "requires": list(REQUIREMENTS.get(kind, ("numpy", "onnxruntime", "pillow", "tokenizers"))),
            "command": f"tritonserver --model-repository {out}"}
