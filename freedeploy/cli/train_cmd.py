"""``freedeploy train``."""

from __future__ import annotations

import re
from typing import Any

import click

from freedeploy.cli.output import emit_json, note, table
from freedeploy.settings import (AUGMENTS, AUTO, DEVICES, EXIT_HEADS, EXIT_INITS, OBJECTIVES, PRETRAINED_FINETUNE,
                                 SCRATCH_FINETUNE, TRAIN_PRECISIONS, TrainConfig)

EXITS_RE = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def parse_exits(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not EXITS_RE.match(value):
        raise click.BadParameter(f"expected comma-separated block numbers such as 2,4,6, got {value!r}")
    return tuple(int(v) for v in value.split(","))


def parse_overrides(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    out = []
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out.append((key.strip(), _literal(raw.strip())))
    return tuple(out)


def _default(name: str) -> Any:
    """An option's default: TrainConfig's field, the one place it is written."""
    return TrainConfig.__dataclass_fields__[name].default


def _literal(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


@click.command()
@click.option("--model", default=_default("model"), show_default=True,
              help="Preset (vit-tiny, deit-tiny, clip-tiny, bert-tiny, vilt-tiny, blip2-tiny), local Hugging Face "
                   "directory or hub id, or an earlier run dir (its backbone and final head are reused).")
@click.option("--data", default=_default("data"), show_default=True,
              help="digits | tweets | vqa-digits | captions-digits | imagefolder:PATH "
                   "| text:PATH[?text=COL&label=COL&encoding=ENC] | vqa:PATH (JSONL of image, question, answer) "
                   "| captions:PATH (JSONL of image, text, prompt)")
@click.option("--exits", callback=parse_exits, help="1-based blocks whose output feeds an exit, e.g. 2,4,6 "
              "[default: quarter points of the depth]")
@click.option("--out", "out", type=click.Path(), help="Run dir to write [default: runs/<data>-<model>].")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=_default("objective"), show_default=True,
              help="Exit loss: FREE (CE + distillation + adversarial), or an ablation.")
@click.option("--labelled-fraction", type=click.FloatRange(0, 1, min_open=True), default=_default("labelled_fraction"),
              show_default=True,
              help="Share of the training split whose labels are used; the rest trains exits without labels.")
@click.option("--finetune-epochs", type=click.IntRange(min=0),
              help=f"Stage 1 epochs [default: 0 if the classifier is trained, {PRETRAINED_FINETUNE[0]} for pretrained "
                   f"weights, {SCRATCH_FINETUNE[0]} from scratch or the preset's recipe].")
@click.option("--exit-epochs", type=click.IntRange(min=1), default=_default("exit_epochs"), show_default=True,
              help="Stage 2 epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_default("batch_size"), show_default=True)
@click.option("--lr", "finetune_lr", type=float,
              help=f"Stage 1 learning rate [default: {PRETRAINED_FINETUNE[1]:g} pretrained, {SCRATCH_FINETUNE[1]:g} "
                   "from scratch, or the preset's recipe].")
@click.option("--exit-lr", type=float, default=_default("exit_lr"), show_default=True, help="Stage 2 learning rate.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=_default("temperature"),
              show_default=True)
@click.option("--kd-weight", type=click.FloatRange(min=0), default=_default("kd_weight"), show_default=True)
@click.option("--adv-weight", type=click.FloatRange(min=0), default=_default("adv_weight"), show_default=True)
@click.option("--adv-warmup", type=click.FloatRange(0, 0.5), default=_default("adv_warmup"), show_default=True,
              help="Share of stage 2 trained before the adversarial term ramps in.")
@click.option("--exit-init", type=click.Choice(EXIT_INITS), default=_default("exit_init"), show_default=True)
@click.option("--exit-head", type=click.Choice((AUTO, *EXIT_HEADS)), default=_default("exit_head"), show_default=True,
              help="auto: evaluate exit blocks for the pooled [CLS] token only where the model pools it "
                   "(the same function at a fraction of the work), the full block otherwise.")
@click.option("--augment", type=click.Choice((AUTO, *AUGMENTS)), default=_default("augment"), show_default=True,
              help="Training augmentation; auto: random shifts for images, none for text.")
@click.option("--max-length", type=click.IntRange(min=2), help="Text: tokens per sequence [default: 99th percentile].")
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--split-seed", type=int, default=_default("split_seed"), show_default=True)
@click.option("--device", type=click.Choice((AUTO, *DEVICES)), default=_default("device"), show_default=True)
@click.option("--precision", type=click.Choice((AUTO, *TRAIN_PRECISIONS)), default=_default("precision"),
              show_default=True,
              help="Training compute: auto uses bf16 autocast on GPUs and on CPUs with AMX / AVX512-BF16.")
@click.option("--preset-config", multiple=True, callback=parse_overrides, metavar="KEY=VALUE",
              help="Override a preset's config field (repeatable), e.g. hidden_size=64.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run dir (only once the new one is complete).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.checkpoint (same options).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def train(as_json: bool, no_progress: bool, out: str | None, **options: Any) -> None:
    """Train FREE early exits on a transformer and write a run dir."""
    from freedeploy.generative.train import is_generative
    from freedeploy.train import train as run_train

    if options["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            from runtimes.errors import ConfigError

            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    out = out or f"runs/{_slug(options['data'])}-{_slug(options['model'])}"
    cfg = TrainConfig(out=out, progress=not no_progress, **options)
    if is_generative(cfg.model, cfg.data):  # a BLIP-2 decoder or image-to-text data: generative FREE
        from freedeploy.generative.train import train_generative

        result = train_generative(cfg, on_stage=None if as_json else note)
        if as_json:
            emit_json({"out": str(result.out), "metrics": result.metrics, "config": result.resolved})
            return
        click.echo(generative_summary(result.metrics["test"]))
        click.echo(f"\nwrote {result.out} in {result.seconds:.0f} s")
        return
    result = run_train(cfg, on_stage=None if as_json else note)
    if as_json:
        emit_json({"out": str(result.out), "metrics": result.metrics, "config": result.resolved})
        return
    click.echo(summary(result.metrics["test"], result.resolved["exits"]))
    click.echo(f"\nwrote {result.out} in {result.seconds:.0f} s")
    click.echo(f"next: freedeploy export {result.out} --target onnx --out bundles/{result.out.name}")


def summary(m: dict[str, Any], exits: list[int]) -> str:
    rows = [[f"exit at block {e['block']}", e["accuracy"], e["agreement"]] for e in m["exits"]]
    rows.append(["final head", m["final_accuracy"], 1.0])
    text = table(["head", "test accuracy", "agreement with final"], rows)
    return f"{text}\noverthinking rate: {m['overthinking_rate']:.4f}  (n = {m['n']} test samples)"


def generative_summary(m: dict[str, Any]) -> str:
    rows = [[f"exit at block {e['block']}", e["token_accuracy"], e["token_agreement"], e["sequence_agreement"]]
            for e in m["exits"]]
    rows.append(["final head", m["final_token_accuracy"], 1.0, 1.0])
    text = table(["head", "test token accuracy", "token agreement", "sequence agreement"], rows)
    return (f"{text}\nfinal head exact match (greedy): {m['final_exact_match']:.4f}  (n = {m['decoded']} of "
            f"{m['n']} test rows decoded; {m['tokens']} target tokens)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1].split(":")[-1]).strip("-") or "run"
