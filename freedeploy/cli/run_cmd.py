"""``freedeploy run``: a bundle on image files, folders, videos, a camera, or text; a
vision-language bundle answers ``--question`` about each image. No torch needed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import click

from freedeploy.cli.choices import BACKEND_CHOICES, PRECISION_CHOICES
from freedeploy.cli.output import emit_json
from runtimes.genconfig import Mode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def parse_thresholds(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float | None] | None:
    """``0.9,off,never``: a number in [0, 1], ``off`` (the exit is not run) or ``never`` (it runs and never
    fires) per exit; the count is checked against the bundle when it is loaded."""
    from runtimes.errors import FreedeployError
    from runtimes.thresholds import NEVER, check_thresholds

    if value is None:
        return None
    out: list[float | None] = []
    words = {"off": None, "none": None, "never": NEVER}
    for part in value.split(","):
        part = part.strip().lower()
        try:
            out.append(words[part] if part in words else float(part))
        except ValueError:
            raise click.BadParameter(f"expected numbers in [0, 1], 'off' or 'never' separated by commas, "
                                     f"got {value!r}") from None
    try:
        check_thresholds(out, "--thresholds", never=True)
    except FreedeployError as exc:
        raise click.BadParameter(str(exc)) from None
    return out


def _sources(inputs: tuple[str, ...], text: bool, max_frames: int | None = None) -> Iterator[tuple[str, Any]]:
    """(name, item) pairs: an item is an image path, an RGB frame, a text, or an Exception to report."""
    if text:
        for t in inputs:
            if t == "-":
                yield from ((f"stdin:{i + 1}", line.rstrip("\n")) for i, line in enumerate(sys.stdin) if line.strip())
            else:
                yield t, t
        return
    for src in inputs:
        path = Path(src)
        if src.isdigit() and not path.exists():
            yield from _frames(int(src), f"camera{src}", max_frames)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                yield src, FileNotFoundError(f"no images in folder {src}")
            yield from ((str(f), str(f)) for f in files)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            yield from _frames(src, src, max_frames)
        elif path.is_file():
            yield src, src
        else:
            yield src, FileNotFoundError(f"{src} does not exist")


def _frames(source: int | str, name: str, max_frames: int | None) -> Iterator[tuple[str, Any]]:
    try:
        import cv2
    except ImportError:
        yield name, ImportError("video files and cameras need OpenCV: pip install 'freedeploy[video]'")
        return
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        yield name, OSError(f"cannot open video source {source}")
        return
    try:
        i = 0
        while max_frames is None or i < max_frames:
            ok, frame = cap.read()
            if not ok:
                return
            yield f"{name}#{i}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            i += 1
    finally:
        cap.release()


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--device", help="cpu, cuda or cuda:N [default: cuda for TensorRT, else cpu]")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), help="[default: fp16 on TensorRT, else fp32]")
@click.option("--thresholds", callback=parse_thresholds, help="Override the bundle's thresholds, e.g. 0.9,0.9,off.")
@click.option("--policy", type=click.Choice(["per_sample", "batch"]), default="per_sample", show_default=True)
@click.option("--max-frames", type=click.IntRange(1), help="Stop a video or camera after this many frames.")
@click.option("--question", help="Vision-language bundles: the question asked about every image.")
@click.option("--prompt", help="Generative bundles: the prompt (a question) for every image [default: none].")
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="exit", show_default=True,
              help="Generative bundles: exit (each token leaves at the first confident exit), speculative (an exit "
                   "drafts, the full model checks: the full model's text) or full (the monolithic decoder).")
@click.option("--max-new-tokens", type=click.IntRange(1), help="Generative bundles [default: what the positions allow].")
@click.option("--deadline-ms", type=float,
              help="Classifier bundles: per input, answer by this many milliseconds with the deepest exit computed "
                   "so far (marked 'forced', outside the certificate); granularity one graph call.")
@click.option("--monitor", "monitor_rate", type=float,
              help="Classifier bundles: check this share of inputs (0 < RATE <= 1) against the final head and warn "
                   "when early exit disagrees with it beyond the certified tolerance.")
@click.option("--monitor-fallback", is_flag=True,
              help="With --monitor: on an alarm, switch early exit off (every input to the final head) until the "
                   "disagreement's upper bound is back under the tolerance.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON list on stdout, a row per input: its result, or its error (see above).")
def run(bundle_dir: str, inputs: tuple[str, ...], backend: str, device: str | None, precision: str | None,
        thresholds: list[float | None] | None, policy: str, max_frames: int | None, question: str | None,
        prompt: str | None, mode: str, max_new_tokens: int | None, deadline_ms: float | None,
        monitor_rate: float | None, monitor_fallback: bool, as_json: bool) -> None:
    """Run a bundle on images (files, folders), a video file, a camera index, or texts ('-': stdin lines).
    A vision-language bundle answers --question about each image; a generative bundle writes text
    for each image (after --prompt, if given) and prints it with the mean block its tokens left at.

    Prints one line per input, naming the block whose output decided ('exit at block 2 of 8',
    'final head (block 8)'); --json rows carry it as "block", beside "exit_index" (the exit's
    position in the bundle; the number of exits means the final head).

    An input that cannot be read, decoded or run gets its own line on stderr, 'NAME: error:
    ...'; every other input still runs, and the command exits with code 10 at the end. In the
    --json list such an input's row is {"input": NAME, "error": {"type": "InputError",
    "exit_code": 10, "message": "..."}} in its place among the results. Results computed so
    far are printed even when the run stops early (Ctrl-C, a failing backend).

    --deadline-ms and --monitor end the run with a summary on stderr: answers forced by the
    deadline, and the drift monitor's checks, disagreement and upper bound against the tolerance.
    """
    from runtimes import Generator, Runtime
    from runtimes.deadline import check_deadline
    from runtimes.errors import ConfigError, InputError
    from runtimes.preprocess import ImageTextSpec, TextSpec

    if deadline_ms is not None:
        check_deadline(deadline_ms)  # before anything loads
    if monitor_fallback and monitor_rate is None:
        raise click.UsageError("--monitor-fallback applies with --monitor RATE")
    watched = {}
    if monitor_rate is not None:
        from runtimes.monitor import Monitor

        watched["monitor"] = Monitor(monitor_rate, fallback=True) if monitor_fallback else monitor_rate
    rt = Runtime.load(bundle_dir, backend=backend, device=device, precision=precision, policy=policy, **watched)
    if thresholds is not None:
        rt.thresholds = thresholds
    if isinstance(rt, Generator):
        if question is not None:
            raise ConfigError("a generative bundle takes --prompt, not --question")
        if deadline_ms is not None:
            raise ConfigError("--deadline-ms applies to classifier bundles; a generative bundle decodes to the end")
        return _generate(rt, inputs, prompt or "", mode, max_new_tokens, max_frames, as_json)
    if prompt is not None or mode != "exit" or max_new_tokens is not None:
        raise ConfigError(f"--prompt, --mode and --max-new-tokens apply to generative bundles; {rt.bundle.name!r} "
                          f"classifies")
    text = isinstance(rt.bundle.preprocess, TextSpec)
    asks = isinstance(rt.bundle.preprocess, ImageTextSpec)
    if asks and not question:
        raise ConfigError(f"bundle {rt.bundle.name!r} answers questions about images: pass --question \"...\"")
    if question is not None and not asks:
        raise ConfigError(f"--question applies to vision-language bundles; {rt.bundle.name!r} takes "
                         f"{rt.bundle.preprocess.kind} inputs")
    asked = {"question": question} if asks else {}
    records: list[dict[str, Any]] = []
    failed = 0
    try:
        for name, item in _sources(inputs, text, max_frames):
            try:
                if isinstance(item, Exception):
                    raise InputError(str(item))
                p = rt.infer([item], question=question, deadline_ms=deadline_ms)[0]
            except InputError as exc:  # this input only: the others still run
                failed += 1
                records.append(_error_row(name, asked, exc))
                continue
            records.append({"input": name, **asked, "label": p.label, "class": p.class_index,
                            "confidence": round(p.confidence, 6), "block": p.block, "exit_index": p.exit_index,
                            **({} if deadline_ms is None else {"forced": p.forced})})
            if not as_json:
                where = (f"final head (block {p.block})" if p.exit_index == len(rt.bundle.exits)
                         else f"exit at block {p.block} of {rt.bundle.num_blocks}")
                click.echo(f"{name}: {p.label}  (confidence {p.confidence:.3f}, {where}"
                           f"{', forced by the deadline' if p.forced else ''})")
    finally:  # a run cut short (Ctrl-C on a camera, a failing backend) still reports what it computed
        if as_json:
            emit_json(records)
        for line in _summary(rt, deadline_ms):
            click.echo(line, err=True)
        rt.close()
    if failed:
        raise click.exceptions.Exit(InputError.exit_code)


def _summary(rt: Any, deadline_ms: float | None) -> list[str]:
    """What --deadline-ms and --monitor saw over the run, for stderr."""
    stats, lines = rt.stats(), []
    d, m = stats.deadline, stats.monitor
    if deadline_ms is not None and d.calls:
        lines.append(f"deadline {deadline_ms:g} ms: {d.forced} of {d.rows} answers forced (outside the certificate), "
                     f"{d.late} late by at most {d.worst_overrun_ms:.2f} ms")
    if m is not None:
        rate = "n/a" if m.checked == 0 else f"{100 * m.disagreement:.2f}%"
        lines.append(f"monitor: {m.checked} of {m.rows} inputs checked against the final head, disagreement {rate} "
                     f"(upper bound {100 * m.upper_bound:.1f}%, tolerance {100 * m.tolerance:.2f}%): {m.state}")
    return lines


def _error_row(name: str, extra: dict[str, Any], exc: Any) -> dict[str, Any]:
    """One input's error: its line on stderr now, and its row for --json."""
    message = " ".join(str(exc).split())
    click.echo(f"{name}: error: {message}", err=True)
    return {"input": name, **extra, "error": {"type": type(exc).__name__, "exit_code": exc.exit_code, "message": message}}


def _generate(rt: Any, inputs: tuple[str, ...], prompt: str, mode: str, max_new: int | None, max_frames: int | None,
              as_json: bool) -> None:
    """``run`` on a generative bundle: one line (or JSON row) of text per image; bad inputs reported alone."""
    from runtimes.errors import InputError

    records: list[dict[str, Any]] = []
    failed, blocks = 0, rt.bundle.num_blocks
    try:
        for name, item in _sources(inputs, False, max_frames):
            try:
                if isinstance(item, Exception):
                    raise InputError(str(item))
                g = rt.generate(item, prompt, max_new_tokens=max_new, mode=mode)
            except InputError as exc:
                failed += 1
                records.append(_error_row(name, {"prompt": prompt}, exc))
                continue
            _, tok = rt.decoding()
            records.append({"input": name, "prompt": prompt, "text": g.text, "mode": g.mode, "tokens": list(g.tokens),
                            "words": [tok.id_to_token(t) for t in g.tokens], "blocks": list(g.blocks),
                            "confidences": [round(c, 6) for c in g.confidences],
                            "mean_exit_block": round(g.mean_exit_block, 3), "calls": g.calls,
                            "ms": round(1000 * g.seconds, 3), "prefill_ms": round(1000 * g.prefill_seconds, 3)})
            if not as_json:
                click.echo(f"{name}: {g.text}  ({mode}: {len(g.tokens)} tokens, mean exit block "
                           f"{g.mean_exit_block:.1f} of {blocks}, {1000 * g.seconds:.1f} ms)")
    finally:
        if as_json:
            emit_json(records)
        rt.close()
    if failed:
        raise click.exceptions.Exit(InputError.exit_code)
