"""Text decoding with early exits on a generative bundle's graphs (no torch), as small parts.

The loop reads everything from the plan (the bundle's decoder head and stages): which graph to call,
which tensor carries which layer's keys and values, which stage's past mask a graph reads, which
input takes a hidden state, which output is a decision. Per sample:

1. ``encode`` turns the image into the prefix; ``prefill`` runs prefix and prompt through every
   layer, fills every layer's cache and decides the first token with the final head;
2. each later token walks the stages (``walk.StageWalk``): after stage k, if exit k is on, its head
   decides, and when its confidence reaches the threshold the token is emitted there; the layers it
   skipped are recomputed by the next token that goes deeper (the default KV rule) or filled at once
   by state propagation (``kv="propagate"``);
3. it stops at the end-of-sequence token or after ``max_new`` tokens.

The parts (ExecuTorch's LLM runner, llama.cpp's decode API):

- ``DecodePlan`` (``plan``): the wiring, looked up once; it pools the sessions;
- ``KVStore`` (``store``): the cache of one or more rows (sequences), per-row lengths, positions and
  per-stage past masks;
- ``StepRunner`` (``step``): binds and runs one row's graphs at ``n`` new tokens;
- ``DecodeSession`` (``session``): one caller's store, runner and prefill; ``open_session`` lends one;
- ``StageWalk`` with a cache policy, ``Recompute`` or ``Propagate`` (``walk``);
- the modes (``modes``): ``greedy_decode``, ``full_decode``, ``speculative_decode``.

**Where the buffers live.** The backend's ``decode_memory()`` says: host numpy arrays by default
(``runtimes.backends.base.HostMemory``: ONNX Runtime binds them in place), device memory on
TensorRT. The parts touch buffers only through its ``alloc``, ``copy`` (region to region: commits,
hidden rows), ``write`` (host values in: tokens, positions, mask entries), ``read`` (host values out:
only the decision of the row that decides, a token and a confidence) and ``bind``, so on a device the
cache never leaves it and per token only those few bytes come back.

This is the rule of ``freedeploy.generative.decode.greedy`` (the torch reference the export
validates against, for either KV rule); the only difference is masked rows, which add exact zeros to
the attention.
"""

from runtimes.decoding.modes import KV_MODES, Decoded, full_decode, greedy_decode, prefill, speculative_decode
from runtimes.decoding.plan import DecodePlan, SessionPool, graph_key
from runtimes.decoding.session import DecodeSession, Prefilled, open_session
from runtimes.decoding.step import MIN_BUCKET, MIN_NEW, StepRunner
from runtimes.decoding.store import KVStore
from runtimes.decoding.walk import ALWAYS, MAX_WAITING, Propagate, Recompute, StageWalk, policy

__all__ = ["Decoded", "DecodePlan", "Prefilled", "KV_MODES", "greedy_decode", "full_decode", "speculative_decode",
           "prefill", "graph_key", "MIN_BUCKET", "MIN_NEW", "MAX_WAITING", "KVStore", "StepRunner", "DecodeSession",
           "open_session", "StageWalk", "Recompute", "Propagate", "policy", "ALWAYS", "SessionPool"]
