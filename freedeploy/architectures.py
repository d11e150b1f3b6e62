"""From a transformers config to a freshly initialised model and its adapter.

Importing this module registers every adapter (the built-in ones in ``freedeploy.adapters`` and the
vision-language one), so a config of any supported family finds its adapter: a run dir rebuilt
by ``freedeploy.rundir`` and a preset built by ``freedeploy.backbones`` go through here alike.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from freedeploy import vision_language  # noqa: F401  (registers the ViLT adapter)
from freedeploy.adapters import Adapter, adapter_for_config

__all__ = ["build_from_config"]


def build_from_config(config: Any) -> tuple[nn.Module, Adapter]:
    """A freshly initialised classification model for a transformers config, with eager attention.

    Eager attention is used everywhere: it exports to plain MatMul/Softmax ONNX that TensorRT fuses
    itself, and its additive mask is what the exported segments rebuild in-graph.
    """
    import transformers

    adapter = adapter_for_config(config)
    config._attn_implementation = "eager"
    hf = getattr(transformers, adapter.model_class)(config)
    return hf.eval(), adapter
