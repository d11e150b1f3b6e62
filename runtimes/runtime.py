"""``Runtime``: load a bundle, feed inputs, get a label at the first confident exit.

    from runtimes import Runtime
    rt = Runtime.load("bundles/digits")              # backend="auto": TensorRT if built, else ONNX Runtime
    result = rt.infer(["frame.png"])                 # paths, PIL images, HWC uint8 arrays, or text
    result = rt.infer("digit.png", question="is it even?")   # vision-language bundles
    result[0].label, result[0].confidence, result[0].block   # the block whose exit (or the final head) answered

Needs numpy and one backend package; never torch. Inputs larger than the bundle's max batch are
split into several calls. ``rt.thresholds`` can be overridden (None disables an exit).
``rt.infer(items, errors="keep")`` runs every input it can and reports the others in
``result.errors`` instead of raising for the whole list. ``rt.infer(items, deadline_ms=...)`` returns
the best answer computed when time is up (``runtimes.deadline``); ``Runtime.load(..., monitor=RATE)``
checks a share of rows against the final head (``runtimes.monitor``); ``rt.stats()`` counts both.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from runtimes.backends import Backend, get_backend
from runtimes.backends.base import device_form
from runtimes.bundle import INT8_HEADS, Bundle, load_bundle
from runtimes.chain import POLICIES, ChainOutput, RecordOutput, record_chain, run_chain, run_full, run_guarded
from runtimes.deadline import Deadline, DeadlineLog, StageClock, check_deadline
from runtimes.errors import BackendUnavailableError, ConfigError, InputError
from runtimes.monitor import Monitor
from runtimes.preprocess import ImageTextSpec, make_encoder
from runtimes.records import Certificate
from runtimes.result import Generation, Prediction, Result, Stats

__all__ = ["Runtime", "Result", "Prediction", "Generation", "GENERATE_MODES", "default_precision"]

log = logging.getLogger(__name__)
GENERATE_MODES = ("exit", "speculative", "full")


class Runtime:
    def __init__(self, bundle: Bundle, backend: Backend, policy: str = "per_sample", nonfinite: str = "error",
                 monitor: Monitor | float | None = None) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if nonfinite not in ("error", "flag"):
            raise ConfigError(f"nonfinite must be 'error' or 'flag', got {nonfinite!r}")
        self.bundle, self.backend, self.policy, self.nonfinite = bundle, backend, policy, nonfinite
        own = self.certificate
        if bundle.calibration and own is None:
            log.warning("bundle %s was calibrated for %s, not for %s: its default thresholds may not hold here; "
                        "run freedeploy calibrate with this backend", bundle.name, ", ".join(bundle.calibration),
                        self.calibration_key)
        self._thresholds = list(own.thresholds) if own else list(bundle.thresholds)
        self._monitor = self._bind_monitor(monitor, own)
        # deadline mode: graph costs, first the certificate's measurements, then what this runtime's calls took
        self._clock, self._deadlines = StageClock(_measured_costs(bundle, own)), DeadlineLog()
        self._encode = make_encoder(bundle.preprocess, bundle.root)
        self._exit_blocks = np.array([e.block for e in bundle.exits] + [bundle.num_blocks], dtype=np.int64)
        # (name, dtype, shape after the batch axis) per input, resolved once: the per-call checks do no parsing
        self._inputs = [(s.name, np.dtype(s.dtype), tuple(s.shape[1:])) for s in bundle.inputs]
        self._closed = False
        self._decode_plan: Any = None  # generative bundles: the decoding plan and tokenizer, loaded on first use
        self._tokenizer: Any = None

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", device: str | None = None,
             precision: str | None = None, policy: str = "per_sample", verify: bool = True,
             nonfinite: str = "error", monitor: Monitor | float | None = None, **options: Any) -> "Runtime":
        """Load a bundle. ``backend``: auto (TensorRT when an engine set for this GPU exists and
        loads, else ONNX Runtime), onnxruntime or tensorrt; ``device``: "cpu", "cuda" or "cuda:N"
        among those the backend takes (``Backend.devices``), by default cuda for TensorRT and cpu
        otherwise; extra options go to the backend (ONNX Runtime's ``threads`` and ``head_threads``:
        integers from 1 to 4 per CPU). ``monitor``: a drift monitor (``runtimes.monitor.Monitor``) or its
        rate, the share of rows also checked against the final head. Anything else is a ConfigError."""
        if device is not None and device_form(device) is None:
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N: a GPU index), got {device!r}")
        bundle = load_bundle(path, verify=verify)
        if backend == "auto":
            has_engines = bundle.root is not None and (bundle.root / "engines").is_dir()
            if has_engines and (device is None or device.startswith("cuda")):
                # each candidate gets the options it takes: an ONNX Runtime setting (threads=...)
                # must not turn TensorRT away, nor a TensorRT one reach ONNX Runtime
                trt, ort = get_backend("tensorrt").takes or (), get_backend("onnxruntime").takes or ()
                unknown = set(options) - set(trt) - set(ort)
                if unknown:
                    raise ConfigError(f"no backend takes {', '.join(sorted(unknown))}")
                try:
                    return cls(bundle, _make("tensorrt", bundle, precision, device or "cuda",
                                             {k: v for k, v in options.items() if k in trt}), policy, nonfinite,
                               monitor)
                except (BackendUnavailableError, ConfigError) as exc:  # engines exist, so saying why is worth a warning
                    log.warning("TensorRT not used, falling back to ONNX Runtime: %s", " ".join(str(exc).split()))
                options = {k: v for k, v in options.items() if k not in trt}
            backend = "onnxruntime"
        default_device = "cuda" if backend == "tensorrt" else "cpu"
        return cls(bundle, _make(backend, bundle, precision, device or default_device, options), policy, nonfinite,
                   monitor)

    @property
    def calibration_key(self) -> str:
        """Which calibration applies here: confidences move with backend, precision and engine set."""
        d = self.backend.describe()
        return "-".join(str(x) for x in (d["backend"], d["precision"], d.get("engine_key")) if x)

    @property
    def certificate(self) -> Certificate | None:
        """The bundle's certificate for this backend and precision, if it was calibrated here."""
        return (self.bundle.calibration or {}).get(self.calibration_key)

    def _bind_monitor(self, monitor: Monitor | float | None, own: Certificate | None) -> Monitor | None:
        """The monitor, given or made from a rate, bound to the certificate's tolerance."""
        if monitor is None:
            return None
        if self.bundle.decoder is not None or self.bundle.task != "classify":
            raise ConfigError(f"monitor= applies to classifier bundles; {self.bundle.name!r} generates text")
        monitor = monitor if isinstance(monitor, Monitor) else Monitor(monitor)
        return monitor.bind(None if own is None else own.delta if own.delta is not None else own.risk_upper_bound)

    @property
    def monitor(self) -> Monitor | None:
        return self._monitor

    def stats(self) -> Stats:
        """Counters since loading: calls made with a deadline (forced answers apart: they are outside the
        certificate) and the drift monitor's (None without one)."""
        return Stats(self._deadlines.stats(self._clock), None if self._monitor is None else self._monitor.stats())

    # thresholds ------------------------------------------------------------------------------------------
    @property
    def thresholds(self) -> list[float | None]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float | None]) -> None:
        self._thresholds = self._checked(values)

    def _checked(self, values: Sequence[float | None]) -> list[float | None]:
        values = list(values)
        if len(values) != len(self.bundle.exits):
            raise ConfigError(f"{len(values)} thresholds given; this bundle has {len(self.bundle.exits)} exits")
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"thresholds must be finite numbers or None, got {v!r}")
        return [None if v is None else float(v) for v in values]

    # inputs -----------------------------------------------------------------------------------------------
    def encode(self, items: Any, question: str | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Raw inputs -> model input arrays; a dict of arrays passes through after checks.

        Vision-language bundles take ``(image, question)`` pairs, or images and ``question`` (one
        question for every image, or one per image)."""
        self._open()
        items = self._items(items, question)
        return self._check(items) if isinstance(items, dict) else self._encode(items)

    def _open(self) -> None:
        if self._closed:
            raise ConfigError("this runtime is closed: load the bundle again (Runtime.load) to run it")

    def _items(self, items: Any, question: str | Sequence[str] | None) -> dict[str, np.ndarray] | list[Any]:
        """A dict of arrays as it is, else the list of raw inputs the encoder takes (pairs when asked)."""
        pairs = isinstance(self.bundle.preprocess, ImageTextSpec)
        if question is not None and not pairs:
            raise InputError("question= applies to vision-language bundles only; this one takes "
                             f"{self.bundle.preprocess.kind} inputs")
        if isinstance(items, dict):
            if question is not None:
                raise InputError("question= cannot be combined with already-encoded arrays")
            return items
        single = isinstance(items, (str, bytes, os.PathLike)) or (hasattr(items, "mode") and hasattr(items, "size")) \
            or (isinstance(items, np.ndarray) and items.ndim in (2, 3))  # a path, a PIL image or one array
        if single or (pairs and question is None and isinstance(items, tuple) and len(items) == 2
                      and isinstance(items[1], str)):
            items = [items]
        if not isinstance(items, (list, tuple)) and not (isinstance(items, np.ndarray) and items.ndim):
            raise InputError(f"inputs must be a path, an image, an array, a str or bytes, a dict of arrays, or a "
                             f"non-empty list of those; got {type(items).__name__}")
        items = list(items)
        if not items:
            raise InputError("empty batch: give at least one input")
        if question is not None:
            if isinstance(question, (str, bytes)):
                questions = [question] * len(items)
            elif isinstance(question, (list, tuple)) and all(isinstance(q, (str, bytes)) for q in question):
                questions = list(question)
            else:
                raise InputError(f"question= must be a str or a list of str, got {type(question).__name__}")
            if len(questions) != len(items):
                raise InputError(f"{len(questions)} questions for {len(items)} images: give one, or one per image")
            items = list(zip(items, questions))
        return items

    def _check(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype, want in self._inputs:
            if name not in arrays:
                raise InputError(f"input {name!r} is missing; the model takes {[n for n, _, _ in self._inputs]}")
            a = np.asarray(arrays[name])
            if a.dtype != dtype:
                raise InputError(f"input {name!r} must be {dtype.name}, got {a.dtype}")
            if a.shape[1:] != want or a.ndim != len(want) + 1:
                raise InputError(f"input {name!r} must have shape (batch, {', '.join(map(str, want))}), got {a.shape}")
            out[name] = a if a.flags.c_contiguous else np.ascontiguousarray(a)
        sizes = {len(a) for a in out.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise InputError(f"inputs need one common, non-zero batch size, got {sorted(sizes)}")
        return out

    def _chunks(self, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n, step = len(next(iter(arrays.values()))), self.bundle.batch.max
        if n <= step:
            return [arrays]
        return [{k: v[i:i + step] for k, v in arrays.items()} for i in range(0, n, step)]

    # inference --------------------------------------------------------------------------------------------
    def infer(self, inputs: Any, policy: str | None = None, thresholds: Sequence[float | None] | None = None,
              question: str | Sequence[str] | None = None, errors: str = "raise",
              deadline_ms: float | None = None) -> Result:
        """Early-exit inference; batches larger than the bundle's max are split. ``thresholds``
        overrides ``rt.thresholds`` for this call only; ``question`` goes with image inputs to a
        vision-language bundle (see ``encode``).

        ``deadline_ms``: milliseconds from this call's start. No graph starts that measured costs say
        cannot end in time (a started one runs to its end); rows still open then take their deepest
        computed exit's answer, marked in ``result.forced`` (outside the certificate). The first exit
        that is on always runs.

        ``errors="raise"`` (default): the first input that cannot be read, encoded or run raises
        its InputError for the whole call. ``errors="keep"``: every other input still runs;
        ``result.errors`` maps each failed row to its InputError, that row holds class -1,
        confidence NaN, exit -1 and block 0, ``result.ok`` masks the rows that ran, and
        ``result[i]`` raises a failed row's error. What is wrong with the call itself (a closed
        runtime, bad thresholds or deadline, a malformed dict of arrays) raises either way."""
        start = time.perf_counter()
        self._open()
        if errors not in ("raise", "keep"):
            raise ConfigError(f"errors must be 'raise' or 'keep', got {errors!r}")
        th = self._thresholds if thresholds is None else self._checked(thresholds)
        policy = policy or self.policy
        deadline = None if deadline_ms is None else self._deadline(start, deadline_ms, th)
        if errors == "keep":
            return self._settled(self._infer_keeping(inputs, th, policy, question, deadline), deadline)
        arrays = self.encode(inputs, question)
        bad = self._nonfinite_rows(arrays)
        if bad is not None and self.nonfinite == "error":
            rows = np.flatnonzero(bad)
            raise InputError(f"{len(rows)} input row(s) contain NaN or Inf (rows {rows[:8].tolist()}); fix the input "
                             "or load the runtime with nonfinite='flag' to run them and flag the results")
        result = self._result([self._chain(c, th, policy, deadline) for c in self._chunks(arrays)])
        if self.nonfinite == "flag":
            result.flagged = np.zeros(len(result), dtype=bool) if bad is None else bad
        return result if deadline is None else self._settled(result, deadline)

    def _deadline(self, start: float, deadline_ms: object, th: list[float | None]) -> Deadline:
        ms = check_deadline(deadline_ms)
        if all(t is None for t in th):
            raise ConfigError("deadline_ms needs an exit that is on: with every threshold None only the final head "
                              "answers, and nothing is computed earlier to answer with")
        return Deadline(start + ms / 1000, self._clock)

    def _chain(self, arrays: dict[str, np.ndarray], th: list[float | None], policy: str,
               deadline: Deadline | None) -> ChainOutput:
        """One chunk: the plain loop, unless a deadline holds or the monitor draws a row (or holds exits off)."""
        monitor = self._monitor
        watch = None if monitor is None else monitor.draw(len(next(iter(arrays.values()))))
        serve = monitor is None or monitor.early_exit_on
        if deadline is None and watch is None and serve:
            return run_chain(self.backend, self.bundle, arrays, th, policy)
        out = run_guarded(self.backend, self.bundle, arrays, th, policy, deadline, watch, serve)
        if monitor is not None and watch is not None:
            early, final = out.checks or (np.zeros(0, np.int64), np.zeros(0, np.int64))
            monitor.update(early, final, out.continued)
        return out

    def _settled(self, result: Result, deadline: Deadline | None) -> Result:
        """Count a call made under a deadline: its forced rows and how late it returned."""
        if deadline is not None:
            forced = result.forced if result.forced is not None else np.zeros(len(result), dtype=bool)
            self._deadlines.add(len(result), result.blocks[forced].tolist(), time.perf_counter() - deadline.end)
        return result

    def _nonfinite_rows(self, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
        """(B,) bool: the rows holding NaN or Inf; None when every row is finite."""
        bad = None
        for a in arrays.values():
            # min and max are finite exactly when every element is (NaN propagates through both); the
            # per-row pass runs only when they are not
            if a.dtype.kind == "f" and a.size and not (math.isfinite(a.min()) and math.isfinite(a.max())):
                rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
                bad = rows if bad is None else bad | rows
        return bad

    def _infer_keeping(self, inputs: Any, th: list[float | None], policy: str,
                       question: str | Sequence[str] | None, deadline: Deadline | None = None,
                       full: bool = False) -> Result:
        """``infer(..., errors="keep")``: a failing input costs its own row only (``full``: the monolithic graph)."""
        items = self._items(inputs, question)
        errors: dict[int, InputError] = {}
        if isinstance(items, dict):
            arrays = self._check(items)
            rows = np.arange(len(next(iter(arrays.values()))))
        else:
            arrays, rows = self._encode_each(items, errors)
        n = len(rows) + len(errors)
        bad = self._nonfinite_rows(arrays) if len(rows) else None
        flagged = None if self.nonfinite == "error" else np.zeros(n, dtype=bool)
        if bad is not None and flagged is not None:
            flagged[rows] = bad
        elif bad is not None:
            errors.update((int(r), InputError("this input contains NaN or Inf")) for r in rows[bad])
            arrays, rows = {k: v[~bad] for k, v in arrays.items()}, rows[~bad]
        classes, confidences = np.full(n, -1, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)
        exits, timings, ran = np.full(n, -1, dtype=np.int64), {}, np.zeros(n, dtype=bool)
        forced = None if deadline is None else np.zeros(n, dtype=bool)
        step = self.bundle.batch.max
        for start in range(0, len(rows), step):
            chunk, where = {k: v[start:start + step] for k, v in arrays.items()}, rows[start:start + step]
            for at, out in self._run_each(chunk, where, th, policy, errors, deadline, full):
                classes[at], confidences[at], exits[at], ran[at] = out.classes, out.confidences, out.exits, True
                if forced is not None:
                    forced[at] = out.forced
                for k, v in out.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
        blocks = np.where(ran, self._exit_blocks[exits], 0)  # the monolithic graph's exit -1: the full depth
        return Result(classes, confidences, exits, self.bundle.labels, blocks, timings, flagged,
                      dict(sorted(errors.items())), forced)

    def _encode_each(self, items: list[Any], errors: dict[int, InputError]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encode the list at once; if an input fails, one by one, so that the others still encode."""
        try:
            return self._encode(items), np.arange(len(items))
        except InputError:
            pass
        parts, rows = [], []
        for i, item in enumerate(items):
            try:
                parts.append(self._encode([item]))
                rows.append(i)
            except InputError as exc:
                errors[i] = exc
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        return arrays, np.array(rows, dtype=np.int64)

    def _run_each(self, chunk: dict[str, np.ndarray], where: np.ndarray, th: list[float | None], policy: str,
                  errors: dict[int, InputError], deadline: Deadline | None = None,
                  full: bool = False) -> list[tuple[np.ndarray, ChainOutput]]:
        """Run one chunk; if the backend rejects it, row by row, so that one input cannot sink the rest."""
        def go(arrays: dict[str, np.ndarray]) -> ChainOutput:
            return run_full(self.backend, self.bundle, arrays) if full else self._chain(arrays, th, policy, deadline)

        try:
            return [(where, go(chunk))]
        except InputError:
            pass
        out = []
        for j, row in enumerate(where):
            try:
                out.append((where[j:j + 1], go({k: v[j:j + 1] for k, v in chunk.items()})))
            except InputError as exc:
                errors[int(row)] = exc
        return out

    def decoding(self) -> tuple[Any, Any]:
        """A generative bundle's decoding plan and tokenizer, loaded on first use."""
        from runtimes import decoding

        self._open()
        d = self.bundle.decoder
        if d is None:
            raise ConfigError(f"bundle {self.bundle.name!r} classifies; generate() needs a generative bundle")
        if self._decode_plan is None:
            import tokenizers

            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.bundle.path(d.tokenizer_file)))
            self._decode_plan = decoding.DecodePlan(self.bundle)
        return self._decode_plan, self._tokenizer

    def speculative_defaults(self) -> tuple[int, int]:
        """Self-speculation's draft exit (index) and draft length: those ``freedeploy calibrate``
        measured best for this backend and precision, else exit 0 and 4 drafts."""
        choice = getattr(self.certificate, "speculative", None)
        if choice is None:
            return 0, 4
        blocks = [e.block for e in self.bundle.exits]
        return blocks.index(choice.draft_block), int(choice.draft_len)

    def generate(self, image: Any, prompt: str = "", max_new_tokens: int | None = None, mode: str = "exit",
                 thresholds: Sequence[float | None] | None = None, draft_exit: int | None = None,
                 draft_len: int | None = None) -> Generation:
        """Greedy text for one image (and an optional prompt) from a generative bundle, to end-of-sequence.

        ``mode``: ``exit`` (each token leaves at the first exit whose confidence reaches its threshold,
        ``rt.thresholds`` unless given; skipped layers get their keys and values by state propagation),
        ``speculative`` (exit ``draft_exit`` drafts ``draft_len`` tokens and the full model checks them in
        one call: the full model's text, faster when drafts are accepted) or ``full`` (the monolithic
        decode step). ``max_new_tokens`` defaults to what the model's positions leave; ``draft_exit`` and
        ``draft_len`` to what calibration measured best (``speculative_defaults``)."""
        from runtimes import decoding

        plan, _ = self.decoding()
        d = self.bundle.decoder
        if mode not in GENERATE_MODES:
            raise ConfigError(f"mode must be one of {', '.join(GENERATE_MODES)}, got {mode!r}")
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        words = self._tokenizer.encode(prompt, add_special_tokens=False).ids if prompt.strip() else []
        ids = [d.bos_id, *words]
        room = d.max_positions - d.num_query_tokens - len(ids)
        max_new = room if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= room:
            raise InputError(f"max_new_tokens must be 1..{room} for this prompt ({len(ids)} tokens; the model has "
                             f"{d.max_positions} positions, {d.num_query_tokens} of them for the image)")
        pixels = self.encode([image])
        image_input = self._decode_plan.image_input
        t0 = time.perf_counter()
        if mode == "exit":
            th = self._checked(thresholds) if thresholds is not None else self._thresholds
            out = decoding.greedy_decode(self.backend, self.bundle, pixels[image_input], ids, max_new, th,
                                         self._decode_plan)
        elif mode == "speculative":
            default_exit, default_len = self.speculative_defaults()
            out = decoding.speculative_decode(self.backend, self.bundle, pixels[image_input], ids, max_new,
                                              default_exit if draft_exit is None else draft_exit,
                                              default_len if draft_len is None else draft_len, self._decode_plan)
        else:
            out = decoding.full_decode(self.backend, self.bundle, pixels[image_input], ids, max_new, self._decode_plan)
        seconds = time.perf_counter() - t0
        text_ids = [t for t in out.tokens if t != d.eos_id]
        blocks = tuple(int(self._exit_blocks[e]) for e in out.exits)
        return Generation(self._tokenizer.decode(text_ids), tuple(out.tokens), blocks, mode, out.calls, seconds,
                          out.prefill_seconds, tuple(float(c) for c in out.confidences))

    def infer_full(self, inputs: Any, question: str | Sequence[str] | None = None, errors: str = "raise") -> Result:
        """The monolithic graph (no early exit): the baseline. ``question`` and ``errors`` as for ``infer``."""
        self._open()
        if errors not in ("raise", "keep"):
            raise ConfigError(f"errors must be 'raise' or 'keep', got {errors!r}")
        if errors == "keep":
            return self._infer_keeping(inputs, self._thresholds, self.policy, question, full=True)
        return self._result([run_full(self.backend, self.bundle, c) for c in self._chunks(self.encode(inputs, question))])

    def record(self, inputs: Any) -> RecordOutput:
        """Every exit's and the final head's confidence and prediction for every row."""
        self._open()
        parts = [record_chain(self.backend, self.bundle, c) for c in self._chunks(self.encode(inputs))]
        return RecordOutput(np.concatenate([p.confidences for p in parts]),
                            np.concatenate([p.predictions for p in parts]))

    def _result(self, parts: list[ChainOutput]) -> Result:
        forced = None if parts[0].forced is None else np.concatenate([p.forced for p in parts])
        if len(parts) == 1:  # one chunk: no copies
            p = parts[0]
            classes, confidences, exits, timings = p.classes, p.confidences, p.exits, dict(p.timings)
        else:
            timings = {}
            for p in parts:
                for k, v in p.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
            classes, confidences, exits = (np.concatenate([getattr(p, f) for p in parts])
                                           for f in ("classes", "confidences", "exits"))
        blocks = self._exit_blocks[exits]  # the monolithic graph reports exit -1: the last entry, the full depth
        return Result(classes, confidences, exits, self.bundle.labels, blocks, timings, forced=forced)

    def close(self) -> None:
        """Release the backend's sessions, engines and buffers; closing twice is harmless. Any later
        call is a ConfigError."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_precision(backend: str, bundle: Bundle) -> str:
    """What runs when no precision is asked for: fp16 engines on TensorRT; on ONNX Runtime the int8-weight
    heads when the bundle was exported with them (``--head-weights int8`` asked for them); else fp32."""
    preferred = {"tensorrt": "fp16", "onnxruntime": INT8_HEADS}.get(backend)
    return preferred if preferred in bundle.precisions else "fp32"


def _measured_costs(bundle: Bundle, cert: Certificate | None) -> dict[str, float]:
    """Seconds per batch-1 call of each chain graph, as the certificate measured them on this backend ({} if not)."""
    costs = None if cert is None else cert.costs_ms
    heads = [s.exit.graph.key for s in bundle.stages if s.exit is not None]
    if costs is None or len(costs.segments) != len(bundle.stages) or len(costs.exits) != len(heads):
        return {}
    return {key: ms / 1000 for key, ms in zip([s.segment.key for s in bundle.stages] + heads,
                                              [*costs.segments, *costs.exits])}


def _make(name: str, bundle: Bundle, precision: str | None, device: str, options: dict[str, Any]) -> Backend:
    chosen = precision or default_precision(name, bundle)
    return get_backend(name)(bundle, precision=chosen, device=device, **options)
