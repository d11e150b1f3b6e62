"""``export_decoder_bundle``: an early-exit decoder -> a validated generative bundle, written atomically.

Graphs (``runtimes.plan.decoder_layout``): ``encode`` (image -> prefix), ``prefill`` (prefix and
prompt -> every layer's keys and values and the first token), per stage a decode step ``step_k``,
an exit ``exit_k`` and a state fill ``fill_k``, and the monolithic decode step ``full_step``.
Dynamic axes: batch, the prompt length, the new tokens (several at once) and the past length.

Validation, every failure collected:

- every graph against its torch module at two batch sizes and two past lengths (max abs diff of
  each float output; a token differs only where torch's top-2 logits are further apart than the
  tolerance);
- greedy decoding by the chained ONNX graphs equals the torch reference
  (``freedeploy.generative.decode.greedy``, itself tested against Hugging Face ``generate``) token
  for token and exit for exit on every test sample, with exits off, and with every exit on at a fixed
  threshold for both KV rules: recomputation (the runtime's default) and state propagation.

The validation record also counts each decoding graph's multiply-adds (``graph_macs``), which
benchmarks report analytic work with.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch

from exporters.config import ExportConfig
from exporters.decoder_graphs import EncodeGraph, ExitGraph, FillGraph, FullStepGraph, PrefillGraph, StepGraph
from exporters.export import write_manifest
from exporters.onnx_export import module2onnx
from exporters.validate import REFERENCE_THRESHOLD
from runtimes import naming
from runtimes.atomic import atomic_directory
from runtimes.backends.onnxruntime import OrtBackend
from runtimes.bundle import BUNDLE_DIR, FINAL_DECISION, BatchSpec, Bundle, by_exit, load_bundle
from runtimes.decoding import DecodePlan, greedy_decode
from runtimes.genconfig import KVRule
from runtimes.errors import ConfigError, ValidationError
from runtimes.plan import GraphLayout, decoder_bundle, decoder_layout
from runtimes.preprocess import Spec
from runtimes.records import VALIDATION_FILE, DecodeCheck, FileCheck, ValidationReport

__all__ = ["DecoderExportData", "DecoderExportResult", "export_decoder_bundle"]

log = logging.getLogger(__name__)
DECODER_TARGETS = ("onnx", "trt-fp32")  # fp16 / int8 decoder graphs: not built yet
# the torch reference decoder: (image (1, C, H, W), prompt ids, max_new, thresholds, kv=KV rule) -> .tokens and
# .exits (exit indices, the number of exits for the final head)
Reference = Callable[..., Any]


@dataclass
class DecoderExportData:
    """Encoded test samples: images (N, C, H, W) float32, prompts (each starting with BOS)."""

    images: np.ndarray
    prompts: list[list[int]]
    targets: list[list[int]]  # the reference continuation of each prompt (EOS included): step-check inputs
    max_new: int


@dataclass
class DecoderExportResult:
    out: Path
    bundle: Bundle
    validation: ValidationReport
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _modules(model: Any) -> dict[str, torch.nn.Module]:
    k_exits = len(model.exits)
    mods: dict[str, torch.nn.Module] = {naming.ENCODE: EncodeGraph(model), naming.PREFILL: PrefillGraph(model),
                                        naming.FULL_STEP: FullStepGraph(model)}
    for k in range(k_exits + 1):
        mods[naming.step_key(k)] = StepGraph(model, k)
        if k < k_exits:
            mods[naming.exit_key(k)] = ExitGraph(model, k)
        if k > 0:
            mods[naming.fill_key(k)] = FillGraph(model, k)
    return mods


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def _feeds(model: Any, layout: Sequence[GraphLayout], data: DecoderExportData, rows: Sequence[int], extra: int,
           new: int, pad: int) -> dict[str, np.ndarray]:
    """Real inputs for every graph: prompts (plus ``extra`` target tokens) prefilled in torch, then
    ``new`` next target tokens as the step's tokens; the hidden states come from the torch chain."""
    seqs = [list(data.prompts[r]) + list(data.targets[r][:extra]) for r in rows]
    ids, mask = _left_pad(seqs, pad)
    feeds = {"pixel_values": data.images[list(rows)], naming.PROMPT_IDS: ids, naming.PROMPT_MASK: mask}
    with torch.no_grad():
        prefix = EncodeGraph(model)(torch.from_numpy(feeds["pixel_values"]))
        out = PrefillGraph(model)(prefix, torch.from_numpy(ids), torch.from_numpy(mask))
    feeds[naming.PREFIX] = prefix.numpy()
    q = prefix.shape[1]
    past_mask = np.concatenate([np.ones((len(rows), q), np.int64), mask], axis=1)
    for layer in range(model.num_blocks):
        k, v = naming.past_kv(layer)
        feeds[k], feeds[v] = out[3 + 2 * layer].numpy(), out[4 + 2 * layer].numpy()
    nxt = [(list(data.targets[r][extra:]) + [pad] * new)[:new] for r in rows]
    feeds[naming.TOKEN_IDS] = np.asarray(nxt, np.int64)
    feeds[naming.POSITIONS] = past_mask.sum(1, keepdims=True) + np.arange(new)[None, :]
    feeds[naming.PAST_MASK] = past_mask
    with torch.no_grad():  # the hidden states the later steps, exits and fills read
        state = {n: torch.from_numpy(a) for n, a in feeds.items()}
        steps = {g.key: g for g in layout}
        for k in range(len(model.exits)):
            names = steps[naming.step_key(k)].input_names
            hidden = StepGraph(model, k)(*[state[n] for n in names])[0]
            state[naming.hidden_name(model.exits[k])] = hidden
            feeds[naming.hidden_name(model.exits[k])] = hidden.numpy()
        feeds[naming.EXIT_HIDDEN] = feeds[naming.hidden_name(model.exits[0])]
    return feeds


def _axes(g: GraphLayout, role: str, output: bool) -> dict[int, str]:
    """The named dynamic axis of a decoder tensor (axis 1), from its graph and role: the prompt, the new
    tokens or the past; none for the image, the prefix and the prefill's decision (the last position)."""
    if g.key == naming.ENCODE or role == "prefix" or (output and g.key == naming.PREFILL and role in FINAL_DECISION):
        return {}
    if g.key == naming.PREFILL and not output:
        return {1: "prompt"}
    if role in ("past_keys", "past_values", "sequence_mask"):
        return {1: "past"}
    return {1: "new"}


def _write_onnx(model: Any, layout: Sequence[Any], feeds: dict[str, np.ndarray], tmp: Path, cfg: ExportConfig,
                max_positions: int, say: Callable[[str], None]) -> dict[str, tuple]:
    mods, specs = _modules(model), {}
    dims = {"prompt": (1, max_positions), "new": (1, max_positions), "past": (1, max_positions)}
    for g in layout:
        say(f"exporting {g.key}")
        in_axes = [_axes(g, role, output=False) for _, role in g.inputs]
        out_axes = [_axes(g, role, output=True) for _, role in g.outputs]
        used = {n for axes in in_axes for n in axes.values()}
        specs[g.key] = module2onnx(mods[g.key], [torch.from_numpy(feeds[n]) for n in g.input_names], g.input_names,
                                   g.output_names, tmp / naming.onnx_file(g.key), opset=cfg.opset,
                                   max_batch=cfg.max_batch, dims={n: dims[n] for n in used}, in_axes=in_axes,
                                   out_axes=out_axes)
    return specs


def _top2_gap(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)
    return part[..., -1] - part[..., -2]


def _compare(bundle: Bundle, model: Any, backend: OrtBackend, feeds_list: Sequence[tuple[int, int, dict]],
             tolerance: float) -> tuple[list[FileCheck], list[str]]:
    mods, rows, failures = _modules(model), [], []
    for batch, past, feeds in feeds_list:
        for g in bundle.graphs:
            names = [t.name for t in g.inputs]
            with torch.no_grad():
                ref = mods[g.key](*[torch.from_numpy(feeds[n]) for n in names])
            ref = [t.numpy() for t in (ref if isinstance(ref, tuple) else (ref,))]
            state = backend.start({n: feeds[n] for n in names})
            backend.run(g.key, state)
            got = backend.fetch(state, [t.name for t in g.outputs])
            logits = None
            for t, r in zip(g.outputs, ref):
                a = got[t.name]
                if t.dtype.startswith("int"):
                    wrong = a != r
                    if logits is not None and wrong.any():
                        wrong &= _top2_gap(logits) > tolerance
                    diff = float(wrong.sum())
                    if diff:
                        failures.append(f"{g.key} output {t.name} at batch {batch}, past {past}: {int(diff)} tokens "
                                        "differ from torch beyond a near-tie")
                else:
                    diff = float(np.abs(a.astype(np.float64) - r.astype(np.float64)).max()) if a.size else 0.0
                    if t.role.endswith("_logits"):
                        logits = r
                    if diff > tolerance:
                        failures.append(f"{g.files['fp32']} output {t.name!r} at batch {batch}, past {past}: max abs "
                                        f"diff {diff:.3g} > tolerance {tolerance:.3g}")
                rows.append(FileCheck(g.files["fp32"], t.name, batch, diff, past))
    return rows, failures


def _agrees(got: Any, reference: Reference, image: np.ndarray, prompt: list[int], max_new: int,
            thresholds: Sequence[float | None], kv: KVRule, blocks: Sequence[int]) -> bool:
    """Whether ``got`` (the chain's decoding) is the torch reference's with the same KV rule, token for
    token and block for block."""
    ref = reference(torch.from_numpy(image), prompt, max_new, thresholds, kv=kv)
    return got.tokens == ref.tokens and got.blocks == [blocks[e] for e in ref.exits]


def _decode_parity(bundle: Bundle, reference: Reference, backend: OrtBackend, data: DecoderExportData,
                   thresholds: Sequence[float | None],
                   kv: KVRule | str = KVRule.RECOMPUTE) -> tuple[int, int, dict[str, int]]:
    """(tokens, sequences that differ from torch, tokens per exit block) of greedy decoding by the
    chained graphs with the KV rule ``kv``."""
    plan, tokens, mismatched, rule = DecodePlan(bundle), 0, 0, KVRule.parse(kv)
    blocks = [*plan.exit_blocks, plan.num_blocks]
    taken = dict.fromkeys(by_exit(plan.exit_blocks, blocks), 0)
    for i, prompt in enumerate(data.prompts):
        image = data.images[i:i + 1]
        got = greedy_decode(backend, bundle, image, prompt, data.max_new, thresholds=thresholds, plan=plan, kv=rule)
        tokens += len(got.tokens)
        mismatched += not _agrees(got, reference, image, prompt, data.max_new, thresholds, rule, blocks)
        for block in got.blocks:
            key = "final" if block == plan.num_blocks else str(block)
            taken[key] += 1
    return tokens, mismatched, taken


def graph_macs(bundle: Bundle) -> dict[str, float]:
    """Multiply-adds per new token of each decoding graph (encode and prefill left out), from its fp32
    weight matrices (MatMul and Gemm with a 2-D initializer operand); attention over the cache is left
    out (small at these lengths)."""
    plan, out = DecodePlan(bundle), {}
    for g in plan.step_graphs():
        model = onnx.load(str(bundle.path(g.files["fp32"])), load_external_data=False)
        weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
        macs = 0.0
        for node in model.graph.node:
            dims = weights.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
            if dims is not None and len(dims) == 2:
                macs += float(dims[0] * dims[1])
        out[g.key] = macs
    return out


def _validate_decoding(bundle: Bundle, reference: Reference, backend: OrtBackend, data: DecoderExportData,
                       exits: int, say: Callable[[str], None]) -> tuple[DecodeCheck, list[str]]:
    """Greedy decoding of the test samples against torch: exits off, then every exit on for each KV rule."""
    n = len(data.prompts)
    say(f"greedy decoding of {n} test samples, ONNX chain vs torch, exits off")
    n_off, bad_off, _ = _decode_parity(bundle, reference, backend, data, [None] * exits)
    on = [REFERENCE_THRESHOLD] * exits
    say(f"... and with every exit on at threshold {REFERENCE_THRESHOLD}, recomputing skipped layers")
    n_on, bad_on, taken = _decode_parity(bundle, reference, backend, data, on, KVRule.RECOMPUTE)
    say("... and propagating their state")
    n_prop, bad_prop, _ = _decode_parity(bundle, reference, backend, data, on, KVRule.PROPAGATE)
    failures = [f"{what}: {bad} of {n} greedy sequences differ from torch"
                for what, bad in (("exits off", bad_off), ("exits on, recomputed", bad_on),
                                  ("exits on, propagated", bad_prop)) if bad]
    check = DecodeCheck(n, data.max_new, n_off, bad_off, REFERENCE_THRESHOLD, n_on, bad_on, taken,
                        KVRule.RECOMPUTE.value, n_prop, bad_prop, graph_macs(bundle))
    return check, failures


def export_decoder_bundle(model: Any, *, data: DecoderExportData, out: Path, cfg: ExportConfig, preprocess: Spec,
                          tokens: dict[str, int], tokenizer_file: Path, provenance: dict[str, Any],
                          reference: Reference, progress: Callable[[str], None] | None = None, sources: Sequence[Path] = ()) -> DecoderExportResult:
    """Write ``out`` (a generative bundle) from an early-exit decoder; validation as the module says, with
    ``reference`` the torch decoder the chained graphs must equal."""
    if cfg.target not in DECODER_TARGETS:
        raise ConfigError(f"generative bundles export to --target {', '.join(DECODER_TARGETS)}, not {cfg.target!r} "
                          "(fp16 / int8 decoder graphs are not built yet)")
    if getattr(model, "own_kv", False):
        raise ConfigError("this decoder's exits keep caches of their own (a training comparison); the bundle's exits "
                          "read the next layer's cache: train with shared keys and values")
    if len(data.prompts) < 2:
        raise ConfigError("export needs at least 2 test samples to trace the graphs")
    say = progress or (lambda m: log.info(m))
    t0, timings = time.perf_counter(), {}
    model = model.eval().float()
    max_positions = int(model.decoder.config.max_position_embeddings)
    layout = decoder_layout("pixel_values", model.exits, model.num_blocks)
    pad = int(tokens["pad"])
    with atomic_directory(out, overwrite=cfg.overwrite, kind=BUNDLE_DIR, inputs=sources) as tmp:
        (tmp / "onnx").mkdir()
        trace = _feeds(model, layout, data, [0, 1], extra=2, new=2, pad=pad)
        specs = _write_onnx(model, layout, trace, tmp, cfg, max_positions, say)
        timings["onnx_export_s"] = time.perf_counter() - t0
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        bundle = decoder_bundle(layout, specs, name=out.name, preprocess=preprocess, num_blocks=model.num_blocks,
                                batch=BatchSpec(1, cfg.opt_batch, cfg.max_batch), tokens=tokens,
                                tokenizer_file="tokenizer.json", num_query_tokens=model.num_query_tokens,
                                max_positions=max_positions, provenance=provenance)
        bundle = write_manifest(tmp, bundle)
        validation = ValidationReport(cfg.target, cfg.validate)
        if cfg.validate:
            t1 = time.perf_counter()
            backend = OrtBackend(bundle, "fp32", threads=None)
            say("validating every graph against torch (batch 1 and 2, two past lengths)")
            cases = []
            for batch, extra in ((1, 0), (2, 3)):
                feeds = _feeds(model, layout, data, list(range(batch)), extra=extra, new=2, pad=pad)
                cases.append((batch, int(feeds[naming.PAST_MASK].shape[1]), feeds))
            rows, failures = _compare(bundle, model, backend, cases, cfg.tolerance)
            decoding, bad = _validate_decoding(bundle, reference, backend, data, len(model.exits), say)
            failures += bad
            if failures:
                raise ValidationError(f"{len(failures)} validation failure(s): " + "; ".join(failures[:5]) +
                                      ("; ..." if len(failures) > 5 else "") + " (use --no-validate to keep the bundle)")
            floats = [r.max_abs_diff for r in rows if not r.output.endswith("prediction")]
            validation = ValidationReport(cfg.target, True, cfg.tolerance, tuple(rows), (), max(floats, default=0.0),
                                          decoding=decoding)
            timings["validation_s"] = time.perf_counter() - t1
        (tmp / VALIDATION_FILE).write_text(json.dumps(validation.to_dict(), indent=2) + "\n")
        bundle = write_manifest(tmp, bundle)
    timings["total_s"] = time.perf_counter() - t0
    return DecoderExportResult(out, load_bundle(out), validation, time.perf_counter() - t0, timings)
