"""The drift monitor on a real bundle: rows to alarm under a real shift, false alarms on clean data,
and what monitoring costs.

    python benchmarks/monitor_bench.py BUNDLE [--rate 0.02] [--noise 120] [--clean-rows 10000] [--seeds 20] [--json]

The shift: the bundle's own test images with Gaussian pixel noise (sigma ``--noise`` on the 0-255
scale, fixed seed). Four measurements, all with ONNX Runtime unless said otherwise:

1. the disagreement of early exit with the full model on the clean and on the noisy test split,
   against the certificate's tolerance;
2. live, batch 1, at ``--rate``: noisy rows (drawn at random from the noisy split) until the alarm;
   then clean rows (``--clean-rows``, drawn likewise) with a fresh monitor, interleaved in bursts
   with a runtime that does not monitor: false alarms and the throughput cost;
3. live, every row checked (rate 1, batches of 64): ``--clean-rows`` clean rows, false alarms;
4. replayed (the recorded answers of every exit and the final head served by the scripted fake
   backend through the same loop and monitor), ``--seeds`` independent runs: rows to alarm on the
   noisy split at ``--rate``, and alarms over long clean runs with every row checked: rows drawn
   from the test split, from the validation and test splits together, and, for the detector alone,
   rows that disagree at random exactly at the tolerance. A finite split replayed at length has
   exactly its own disagreement rate: where that lies above the tolerance, an alarm is the monitor
   being right about that population, not a false alarm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.evaluation import bundle_split  # noqa: E402
from calibration.thresholds import exit_decisions  # noqa: E402
from runtimes import Runtime  # noqa: E402
from runtimes.backends.fake import FakeBackend, fake_bundle  # noqa: E402
from runtimes.monitor import Monitor  # noqa: E402


def _disagreement(record, thresholds: list) -> float:
    taken = exit_decisions(record.confidences, thresholds)
    return float((record.predictions[np.arange(len(taken)), taken] != record.predictions[:, -1]).mean())


def _one(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i:i + 1] for k, v in arrays.items()}


def _live_alarm(bundle: str, noisy: dict[str, np.ndarray], rate: float, seed: int, cap: int = 100_000) -> dict:
    rt = Runtime.load(bundle, backend="onnxruntime", monitor=Monitor(rate, seed=seed))
    rows = np.random.default_rng(seed).integers(0, len(next(iter(noisy.values()))), cap)
    t0 = time.perf_counter()
    for r in rows:
        rt.infer(_one(noisy, int(r)))
        if rt.stats().monitor.alarms:
            break
    m = rt.stats().monitor
    rt.close()
    return {"rows": m.rows, "checked_rows_to_alarm": m.rows_to_alarm, "alarmed": m.alarms > 0,
            "seconds": round(time.perf_counter() - t0, 1)}


def _live_clean(bundle: str, clean: dict[str, np.ndarray], rate: float, rows: int, seed: int, burst: int = 250) -> dict:
    """Monitored and plain runtimes in alternating bursts of batch-1 calls over the same rows (the time
    inside ``infer`` only)."""
    watched = Runtime.load(bundle, backend="onnxruntime", monitor=Monitor(rate, seed=seed))
    plain = Runtime.load(bundle, backend="onnxruntime")
    order = np.random.default_rng(seed + 1).integers(0, len(next(iter(clean.values()))), rows)
    for rt in (watched, plain):  # warm both
        for r in order[:50]:
            rt.infer(_one(clean, int(r)))
    watched.monitor.reset()
    spent = {"watched": 0.0, "plain": 0.0}
    checked_ms, unchecked_ms = [], []  # the monitored runtime's calls, by whether the monitor drew their row
    for start in range(0, rows, burst):
        part = order[start:start + burst]
        for name, rt in (("watched", watched), ("plain", plain)) if (start // burst) % 2 else (
                ("plain", plain), ("watched", watched)):
            for r in part:
                drawn = watched.monitor.stats().drawn if rt is watched else 0  # outside the timed call
                t0 = time.perf_counter()
                rt.infer(_one(clean, int(r)))
                took = time.perf_counter() - t0
                spent[name] += took
                if rt is watched:
                    (checked_ms if watched.monitor.stats().drawn > drawn else unchecked_ms).append(1000 * took)
    m = watched.stats().monitor
    watched.close()
    plain.close()
    return {"rows": m.rows, "checked": m.checked, "continued": m.continued, "disagreements": m.disagreements,
            "alarms": m.alarms, "upper_bound": round(m.upper_bound, 4),
            "plain_calls_per_s": round(rows / spent["plain"], 1), "monitored_calls_per_s": round(rows / spent["watched"], 1),
            "throughput_cost": round(spent["watched"] / spent["plain"] - 1, 4),
            "checked_call_ms_median": round(float(np.median(checked_ms)), 3),
            "unchecked_call_ms_median": round(float(np.median(unchecked_ms)), 3),
            # the extra rows' share: what checked calls took beyond an unchecked call, over all calls' time
            "cost_of_checked_rows": round(float(np.sum(checked_ms) - len(checked_ms) * np.median(unchecked_ms))
                                          / float(np.sum(checked_ms) + np.sum(unchecked_ms)), 4)}


def _live_all_checked(bundle: str, clean: dict[str, np.ndarray], rows: int, seed: int) -> dict:
    rt = Runtime.load(bundle, backend="onnxruntime", monitor=Monitor(1.0, seed=seed))
    order = np.random.default_rng(seed + 2).integers(0, len(next(iter(clean.values()))), rows)
    for start in range(0, rows, 64):
        rt.infer({k: v[order[start:start + 64]] for k, v in clean.items()})
    m = rt.stats().monitor
    rt.close()
    return {"rows": m.rows, "checked": m.checked, "disagreement": round(m.disagreement, 4), "alarms": m.alarms,
            "checked_rows_to_alarm": m.rows_to_alarm, "upper_bound": round(m.upper_bound, 4)}


def _replay(conf: np.ndarray, pred: np.ndarray, thresholds: list, tolerance: float, rows: np.ndarray, rate: float,
            seed: int, stop: bool) -> dict:
    bundle = fake_bundle(len(thresholds))
    rt = Runtime(bundle, FakeBackend(bundle, confidences=conf, predictions=pred),
                 monitor=Monitor(rate, tolerance=tolerance, seed=seed))
    rt.thresholds = thresholds
    batch = 1 if stop else 64
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch].astype(np.float32)
        rt.infer({"x": part.reshape(len(part), 1, 1, 1)})
        if stop and rt.stats().monitor.alarms:
            break
    m = rt.stats().monitor
    return {"rows": m.rows, "checked": m.checked, "alarms": m.alarms, "checked_rows_to_alarm": m.rows_to_alarm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--rate", type=float, default=0.02)
    ap.add_argument("--noise", type=float, default=120.0)
    ap.add_argument("--clean-rows", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--replay-clean-rows", type=int, default=100_000)
    ap.add_argument("--replay-only", action="store_true", help="skip the live measurements (2 and 3)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rt = Runtime.load(args.bundle, backend="onnxruntime")
    data, idx = bundle_split(rt.bundle, None, "test")
    images = [data.items[i] for i in idx]
    _, val_idx = bundle_split(rt.bundle, None, "val")
    rec_val = rt.record(rt.encode([data.items[i] for i in val_idx]))
    rng = np.random.default_rng(0)
    noisy_images = [np.clip(img + rng.normal(0, args.noise, img.shape), 0, 255).astype(np.uint8) for img in images]
    clean, noisy = rt.encode(images), rt.encode(noisy_images)
    rec_clean, rec_noisy = rt.record(clean), rt.record(noisy)
    cert = rt.bundle.calibration[rt.calibration_key]
    th, n = rt.thresholds, len(images)
    rt.close()
    out: dict = {"bundle": args.bundle, "tolerance": cert.delta, "epsilon": cert.epsilon, "rate": args.rate,
                 "noise_sigma": args.noise, "test_rows": n,
                 "disagreement_clean": round(_disagreement(rec_clean, th), 4),
                 "disagreement_noisy": round(_disagreement(rec_noisy, th), 4)}
    if not args.replay_only:
        out["live_alarm"] = _live_alarm(args.bundle, noisy, args.rate, seed=0)
        out["live_clean"] = _live_clean(args.bundle, clean, args.rate, args.clean_rows, seed=0)
        out["live_all_checked"] = _live_all_checked(args.bundle, clean, args.clean_rows, seed=0)

    # rows [0, n) clean test, [n, 2n) noisy test, [2n, 2n + v) validation
    conf = np.concatenate([rec_clean.confidences, rec_noisy.confidences, rec_val.confidences])
    pred = np.concatenate([rec_clean.predictions, rec_noisy.predictions, rec_val.predictions])
    v = len(val_idx)
    pools = {"test": (0, n), "val+test": None}
    out["disagreement_val+test"] = round(_disagreement(rec_val, th) * v / (v + n) + out["disagreement_clean"] * n / (v + n), 4)
    alarm_rows, clean = [], {name: [] for name in (*pools, "at the tolerance")}
    for seed in range(args.seeds):
        r = np.random.default_rng(100 + seed)
        a = _replay(conf, pred, th, cert.delta, r.integers(n, 2 * n, 200_000), args.rate, seed, stop=True)
        alarm_rows.append((a["rows"], a["checked_rows_to_alarm"]))
        for name in pools:
            draw = r.integers(0, n + v, args.replay_clean_rows) if name == "val+test" else r.integers(0, n, args.replay_clean_rows)
            draw = np.where(draw >= n, draw + n, draw)  # past the test rows: the validation rows, not the noisy ones
            clean[name].append(_replay(conf, pred, th, cert.delta, draw, 1.0, seed, stop=False)["checked_rows_to_alarm"])
        m = Monitor(1.0, tolerance=cert.delta)
        x = (r.random(args.replay_clean_rows) < cert.delta).astype(np.int64)
        m.update(x, np.zeros_like(x))
        clean["at the tolerance"].append(m.stats().rows_to_alarm)
    rows, checked = np.array(alarm_rows, dtype=float).T
    out["replay"] = {"seeds": args.seeds,
                     "rows_to_alarm": {"median": float(np.median(rows)), "max": float(rows.max()), "min": float(rows.min())},
                     "checked_rows_to_alarm": {"median": float(np.median(checked)), "max": float(checked.max())},
                     "clean_rows_per_run": args.replay_clean_rows,
                     "clean_runs_with_an_alarm": {k: sum(a is not None for a in v) for k, v in clean.items()},
                     "clean_checked_rows_to_alarm": {k: [a for a in v if a is not None] for k, v in clean.items()}}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"tolerance {100 * out['tolerance']:.2f}% (epsilon {out['epsilon']}), test split {n} rows: disagreement "
          f"{100 * out['disagreement_clean']:.2f}% clean, {100 * out['disagreement_noisy']:.2f}% with noise sigma "
          f"{args.noise:g}")
    if "live_alarm" in out:
        a = out["live_alarm"]
        print(f"live, rate {args.rate}: alarm after {a['rows']} noisy rows ({a['checked_rows_to_alarm']} checked), "
              f"{a['seconds']} s")
        c = out["live_clean"]
        print(f"live, rate {args.rate}, {c['rows']} clean rows: {c['alarms']} alarms, {c['checked']} checked, "
              f"{c['disagreements']} disagreed (upper bound {100 * c['upper_bound']:.1f}%); "
              f"{c['plain_calls_per_s']} calls/s plain, {c['monitored_calls_per_s']} monitored: cost "
              f"{100 * c['throughput_cost']:.1f}%; a checked call {c['checked_call_ms_median']} ms, an unchecked one "
              f"{c['unchecked_call_ms_median']} ms (medians): the checked rows' share of the time "
              f"{100 * c['cost_of_checked_rows']:.1f}%")
        c = out["live_all_checked"]
        print(f"live, rate 1, {c['rows']} clean rows in batches of 64: {c['alarms']} alarms (disagreement "
              f"{100 * c['disagreement']:.2f}%, upper bound {100 * c['upper_bound']:.2f}%)")
    r = out["replay"]
    print(f"replay, {r['seeds']} seeds: rows to alarm at rate {args.rate}: median {r['rows_to_alarm']['median']:.0f}, "
          f"range {r['rows_to_alarm']['min']:.0f}-{r['rows_to_alarm']['max']:.0f} (checked rows: median "
          f"{r['checked_rows_to_alarm']['median']:.0f}, max {r['checked_rows_to_alarm']['max']:.0f}); clean, every row "
          f"checked, {r['clean_rows_per_run']} rows per run, runs with an alarm: {r['clean_runs_with_an_alarm']} "
          f"(val+test disagreement {100 * out['disagreement_val+test']:.2f}%); checked rows to those alarms: "
          f"{r['clean_checked_rows_to_alarm']}")


if __name__ == "__main__":
    main()
