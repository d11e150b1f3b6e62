"""torch module -> ONNX file with a dynamic batch axis (``module2onnx``)."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

from exporters.config import DEFAULT_OPSET
from runtimes.bundle import TensorSpec
from runtimes.errors import ExportError

__all__ = ["module2onnx", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)



def _spec(name: str, t: torch.Tensor, axes: Mapping[int, str] | None = None) -> TensorSpec:
    dtype = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
             torch.bool: "bool"}[t.dtype]
    axes = axes or {}
    return TensorSpec(name, dtype, ("batch", *[axes.get(i, int(d)) for i, d in enumerate(t.shape) if i > 0]))


def module2onnx(module: torch.nn.Module, args: Sequence[torch.Tensor], input_names: Sequence[str],
                output_names: Sequence[str], path: Path, opset: int = DEFAULT_OPSET,
                max_batch: int = 64, dims: Mapping[str, tuple[int, int]] | None = None,
                in_axes: Sequence[Mapping[int, str]] | None = None,
                out_axes: Sequence[Mapping[int, str]] | None = None) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Export with the dynamo exporter; returns the input and output tensor specs it wrote.

    The example batch must be 2 or more: a batch-1 example lets the exporter fix the batch axis.
    Other dynamic axes (a decoder's new tokens and past length): ``dims`` names each with its
    (min, max), ``in_axes`` / ``out_axes`` give per input / output ``{axis: name}``; the examples must
    not be 0 or 1 along them, and a name shared by two inputs is one size.
    """
    if len(args[0]) < 2:
        raise ExportError("export needs an example batch of 2 or more rows")
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, len(args[0])))
    named = {n: torch.export.Dim(n.replace("+", "_"), min=lo, max=hi) for n, (lo, hi) in (dims or {}).items()}
    in_axes = list(in_axes or [{} for _ in args])
    dynamic: tuple = tuple({0: batch, **{a: named[n] for a, n in axes.items()}} for axes in in_axes)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic = (dynamic,)  # forward(*tensors): torch.export sees one argument holding them all
    module.eval()
    with torch.no_grad():
        outputs = module(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    captured = io.StringIO()
    # the exporter warns about every torchvision operator it cannot register when torchvision is absent
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        # the exporter prints progress on stdout, which must stay clean for --json output
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(args), str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=dynamic, opset_version=opset,
                              external_data=False, dynamo=True, optimize=True, verbose=False)
    except Exception as exc:  # torch.export raises many types; the message is what matters
        log.debug("exporter output:\n%s", captured.getvalue())
        raise ExportError(f"ONNX export of {path.name} failed: {str(exc).splitlines()[0]}") from exc
    out_axes = list(out_axes or [{} for _ in outputs])
    return (tuple(_spec(n, a, ax) for n, a, ax in zip(input_names, args, in_axes)),
            tuple(_spec(n, o, ax) for n, o, ax in zip(output_names, outputs, out_axes)))
