"""The bundle plan's vocabulary: tensor dtypes and roles, graph kinds, head forms and tasks.

A module of its own, with no imports, so the manifest (``runtimes.bundle``), its rules
(``runtimes.contract``), its migration and the plan builder all read the same words without importing
each other. ``docs/bundle.md`` defines each word for readers in other languages.
"""

from __future__ import annotations

__all__ = ["DTYPES", "EXIT_DECISION", "FINAL_DECISION", "DECODER_ROLES", "KV_ROLES", "ROLES", "GRAPH_KINDS",
           "HEADS", "TASKS", "decision_field"]

DTYPES = ("float32", "float16", "int64", "int32", "bool")
EXIT_DECISION = ("exit_logits", "exit_confidence", "exit_prediction")  # an exit head's outputs, in order
FINAL_DECISION = ("final_logits", "final_confidence", "final_prediction")  # the last segment's and full's
# a decoder's graphs also carry: the image prefix, the tokens and their positions, the 0/1 mask over
# the whole sequence, and per layer (``TensorSpec.layer``) the cached keys and values going in and
# the new tokens' keys and values coming out
DECODER_ROLES = ("prefix", "token_ids", "positions", "sequence_mask", "past_keys", "past_values", "new_keys",
                 "new_values")
KV_ROLES = ("past_keys", "past_values", "new_keys", "new_values")
ROLES = ("model_input", "hidden", "token_mask", *EXIT_DECISION, *FINAL_DECISION, *DECODER_ROLES)
# classifiers: segment, exit, full. Decoders: encode (image -> prefix), prefill (prompt -> cache and the
# first token), decode_step (one stage, or the monolithic step), exit, state_fill (optional propagation)
GRAPH_KINDS = ("segment", "exit", "full", "encode", "prefill", "decode_step", "state_fill")
HEADS = ("cls-query", "full-block")  # the exit head forms (freedeploy.adapters builds them)
TASKS = ("classify", "generate")  # the tag of a bundle's head: ClassifierHead, DecoderHead


def decision_field(role: str) -> str | None:
    """``logits``, ``confidence`` or ``prediction`` for an exit's or the final head's decision roles;
    None for every other role."""
    return role.partition("_")[2] if role in EXIT_DECISION or role in FINAL_DECISION else None
