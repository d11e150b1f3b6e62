"""The few naming rules a bundle still has, in one place.

A bundle's plan (``bundle.json``, schema version 3) lists every graph with its key and kind and
every tensor with its name and role, so readers (the runtime loop, the backends, calibration,
validation, a reader in another language) look names up in the plan and never build them. Only
the writers need the rules below: the builder that lays out a new plan (``runtimes.plan``), the
exporter that names its torch modules' inputs and outputs after that layout, and the migration of
version-1 manifests, whose plan was implied by exactly these names.

    segment_<k>      graph key of the k-th backbone segment (0-based, chain order)
    exit_<k>         graph key of the exit head after segment k
    full             graph key of the monolithic graph (the baseline)
    token_mask       the token mask segment 0 computes (an image with a question)
    hidden_<e>       the hidden state after block e (1-based): what exit heads and the next segment read
    logits_<k>, confidence_<k>, prediction_<k>   exit k's decision
    logits, confidence, prediction               the final head's decision
    onnx/<key>.onnx, onnx/<precision>/<key>.onnx the graph's file per precision
    <key>.plan       a TensorRT engine inside engines/<target-key>/

A decoder's bundle (task generate) adds:

    encode, prefill, full_step     graph keys: image -> prefix; the prompt through every layer; the
                                   monolithic decode step (the baseline)
    step_<k>, exit_<k>, fill_<k>   decode-step segment k, its exit, and stage k's state fill
    past_key_<l>, past_value_<l>   layer l's cached keys / values going in (0-based layer)
    key_<l>, value_<l>             the new tokens' keys / values of layer l coming out
    token_ids, positions, past_mask, prefix, prompt_ids, prompt_mask, exit_hidden
    first_logits, first_confidence, first_prediction   the prefill's decision (the first new token)
"""

from __future__ import annotations

__all__ = ["ENCODE", "PREFILL", "FULL_STEP", "TOKEN_IDS", "POSITIONS", "PAST_MASK", "PREFIX", "PROMPT_IDS",
           "PROMPT_MASK", "EXIT_HIDDEN", "FIRST_DECISION", "step_key", "fill_key", "past_kv", "new_kv",
           "FULL", "TOKEN_MASK", "is_hidden_name", "FINAL_DECISION", "segment_key", "exit_key", "hidden_name", "exit_decision", "onnx_file",
           "plan_file", "DECISION_FIELDS"]

FULL = "full"
TOKEN_MASK = "token_mask"  # the mask segment 0 computes when the blocks' tokens are not the input tokens
DECISION_FIELDS = ("logits", "confidence", "prediction")  # the order a head's graph emits them in
FINAL_DECISION = DECISION_FIELDS


ENCODE, PREFILL, FULL_STEP = "encode", "prefill", "full_step"
TOKEN_IDS, POSITIONS, PAST_MASK = "token_ids", "positions", "past_mask"
PREFIX, PROMPT_IDS, PROMPT_MASK, EXIT_HIDDEN = "prefix", "prompt_ids", "prompt_mask", "exit_hidden"
FIRST_DECISION = ("first_logits", "first_confidence", "first_prediction")


def step_key(k: int) -> str:
    return f"step_{k}"


def fill_key(k: int) -> str:
    return f"fill_{k}"


def past_kv(layer: int) -> tuple[str, str]:
    return f"past_key_{layer}", f"past_value_{layer}"


def new_kv(layer: int) -> tuple[str, str]:
    return f"key_{layer}", f"value_{layer}"


def segment_key(k: int) -> str:
    return f"segment_{k}"


def exit_key(k: int) -> str:
    return f"exit_{k}"


def hidden_name(block: int) -> str:
    return f"hidden_{block}"


def is_hidden_name(name: object) -> bool:
    """Whether a version-1 tensor name is a hidden state (``hidden_<e>``)."""
    return isinstance(name, str) and name.startswith("hidden_") and name[7:].isdigit()


def exit_decision(k: int) -> tuple[str, str, str]:
    """(logits, confidence, prediction) tensor names of exit k."""
    return tuple(f"{field}_{k}" for field in DECISION_FIELDS)  # type: ignore[return-value]


def onnx_file(key: str, precision: str = "fp32") -> str:
    """Path of a graph's ONNX file relative to the bundle root."""
    return f"onnx/{key}.onnx" if precision == "fp32" else f"onnx/{precision}/{key}.onnx"


def plan_file(key: str) -> str:
    """File name of a graph's TensorRT plan inside its engine set."""
    return f"{key}.plan"
