"""Does choosing the ratio per context (``ratio="auto"``) beat one fixed ratio at the same mean memory?

Two steps, so that the expensive one never depends on a fit:

``run``: on held-out samples (seed 0 by default; calibration files are fitted on seeds from 1,000,003), one prefill
per context records each press's scores, the context's NLL and the score statistics
(:func:`kvpress_like.calibration.score_statistics`); then the full cache is compressed from those scores at every
retention of a grid (0.1 steps to 0.5, then 0.05 steps) and, at each, the greedy answer is scored (RULER string
match) and the answer's teacher-forced NLL measured; every grid cache of a context is decoded as one padded batch.
One JSON line per context, appended as it finishes (an interrupted run resumes).

``report``: for each quality target, the calibrated press's retention for each context comes from a calibration file
(rounded to the nearest grid retention); the fixed press uses the ratio giving the same mean kept fraction over the
set; where that falls between two grid retentions, each context's fixed score is interpolated linearly between them
(the expected score of a fixed press drawing one of the two ratios with the probabilities that give that mean). The
oracle picks each context's retention with hindsight (the best score at the same mean kept fraction, by a Lagrangian
sweep over the grid). Reported: task score and NLL-quality (``NLL(answer | full) / NLL(answer | compressed)``,
clipped to [0, 1]) with 95 % bootstrap intervals of the paired differences, the share of the oracle's gain
recovered, and R² of the predicted against the measured per-context best retention.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/calibration_eval.py run --lengths 1024 2048 --samples 8 \\
        --output benchmarks/recorded/calibration_eval.jsonl
    OMP_NUM_THREADS=1 python benchmarks/calibration_eval.py report benchmarks/recorded/calibration_eval.jsonl \\
        --quality 0.9 0.8 0.7 --plot docs/calibration_eval.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "vt", "qa_1"]
GRID = [0.1, 0.2, 0.3, 0.4] + [round(0.5 + 0.05 * i, 2) for i in range(11)]  # retentions 0.1 .. 1.0


def run(args) -> None:
    import transformers

    import kvpress_like
    from kvpress_like.cache import kept_fraction, prefill
    from kvpress_like.calibration import ScoreRecorder, recorded_scores
    from kvpress_like.context import press as press_context
    from kvpress_like.eval.calibration import answer_ids_of, answer_nlls, stack_padded
    from kvpress_like.eval.metrics import score
    from kvpress_like.eval.model import load_model
    from kvpress_like.eval.runner import answer_rows, read_jsonl
    from kvpress_like.eval.tasks import generate_samples
    from kvpress_like.pipeline import encode_prompt

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["length"], r["index"], r["seed"]) for r in read_jsonl(output)}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, kvpress-like {kvpress_like.__version__}", flush=True)
    model, tokenizer = load_model("default")
    recorder = ScoreRecorder.of({name: kvpress_like.create_press(name) for name in args.presses})
    for index in range(args.samples):  # interleaved, so that a stopped run has every task and length
        for length in args.lengths:
            for task in args.tasks:
                if (task, length, index, args.seed) in done:
                    continue
                start = time.perf_counter()
                sample = generate_samples(task, tokenizer, length, index + 1, seed=args.seed)[index]
                context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question,
                                                        sample.answer_prefix)
                answer_ids = answer_ids_of(tokenizer, sample.answers)
                budget = min(args.max_new_tokens, sample.max_new_tokens)
                with torch.no_grad(), press_context(model, recorder):
                    full = prefill(model, context_ids)
                    recorded = recorded_scores(full)  # this prefill's scores and NLL, left on its cache
                    record = {"task": task, "length": length, "index": index, "seed": args.seed,
                              "tokens": context_ids.shape[1], "features": {}, "grid": {}}
                    cells = [(None, None)]  # row 0: the full cache; then one row per (press, retention)
                    for name in recorded.labels:
                        record["features"][name] = recorded.features(name, context_ids.shape[1])
                        cells += [(name, r) for r in args.grid if r < 1.0]
                    nlls, answers = [], []
                    for first in range(0, len(cells), args.batch):  # a batch of rows at a time (memory)
                        caches = []
                        for j, (name, retention) in enumerate(cells[first : first + args.batch]):
                            caches.append(copy.deepcopy(full))
                            if name is not None:
                                recorded.compress_at(name, caches[-1], 1.0 - retention)
                                cells[first + j] = (name, {"retention": retention, "kept": kept_fraction(caches[-1])})
                        batch = stack_padded(caches)
                        del caches
                        nlls += answer_nlls(model, batch, suffix_ids, answer_ids)
                        answers += answer_rows(model, batch, context_ids, suffix_ids, budget)
                        del batch
                    del full, recorded
                    cells = cells[1:]
                predictions = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
                scores = [score(sample.metric, x, sample.answers) for x in predictions]
                record["full"] = {"score": scores[0], "nll": nlls[0], "prediction": predictions[0]}
                for (name, cell), s, nll, prediction in zip(cells, scores[1:], nlls[1:], predictions[1:]):
                    record["grid"].setdefault(name, []).append({**cell, "score": s, "nll": nll,
                                                                "prediction": prediction})
                for name in recorder.labels:
                    if 1.0 in args.grid:
                        record["grid"][name].append({"retention": 1.0, "kept": 1.0, "score": scores[0],
                                                     "nll": nlls[0]})
                record["seconds"] = round(time.perf_counter() - start, 1)
                with output.open("a", encoding="utf-8") as sink:
                    sink.write(json.dumps(record) + "\n")
                print(f"{task} {length} #{index}: full {scores[0]:.2f}, {record['seconds']} s", flush=True)


# -- report -----------------------------------------------------------------------------------------------------------
def nll_quality(nll_full: float, nll: float) -> float:
    return min(1.0, nll_full / max(nll, 1e-6))


def cell_value(record: dict, name: str, retention: float, key: str) -> float:
    """Score (``key="score"``), NLL-quality (``"quality"``) or kept fraction (``"kept"``) of one context at a
    retention, linearly interpolated between the two neighbouring grid retentions."""
    cells = record["grid"][name]
    rs = [c["retention"] for c in cells]

    def at(i):
        c = cells[i]
        return nll_quality(record["full"]["nll"], c["nll"]) if key == "quality" else c[key]

    if retention <= rs[0]:
        return at(0)
    for i in range(1, len(rs)):
        if retention <= rs[i] + 1e-9:
            w = (retention - rs[i - 1]) / (rs[i] - rs[i - 1])
            return (1 - w) * at(i - 1) + w * at(i)
    return at(len(rs) - 1)


def nearest(grid: list[float], value: float) -> float:
    return min(grid, key=lambda r: abs(r - value))


def fixed_retention_for(records, name, mean_kept: float) -> float:
    """The single retention whose (interpolated) kept fraction, averaged over ``records``, equals ``mean_kept``."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        kept = sum(cell_value(r, name, mid, "kept") for r in records) / len(records)
        low, high = (mid, high) if kept < mean_kept else (low, mid)
    return (low + high) / 2


def oracle_choice(records, name, mean_kept: float, key: str = "score") -> list[float]:
    """Per context, the grid retention chosen with hindsight: maximise the summed ``key`` subject to the mean kept
    fraction <= ``mean_kept`` (Lagrangian sweep: each context maximises value - lam * kept, ties to less memory; the
    best feasible choice over the sweep)."""
    table = [[(cell_value(r, name, c["retention"], key), c["kept"], c["retention"]) for c in r["grid"][name]]
             for r in records]
    best, best_value = None, -math.inf
    for lam in [x / 100 for x in range(0, 501)]:
        picks = [max(cells, key=lambda c: (c[0] - lam * c[1], -c[1])) for cells in table]
        if sum(c[1] for c in picks) / len(picks) <= mean_kept + 1e-9:
            value = sum(c[0] for c in picks)
            if value > best_value:
                best, best_value = [c[2] for c in picks], value
    return best


def measured_best(record, name, quality: float) -> float:
    """The smallest grid retention whose NLL-quality is >= ``quality`` (1.0 if none)."""
    for c in record["grid"][name]:
        if nll_quality(record["full"]["nll"], c["nll"]) >= quality:
            return c["retention"]
    return 1.0


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def loo_r_squared(features: list[list[float]], target: list[float]) -> float:
    """Leave-one-out R² of a least-squares linear predictor (with intercept) of ``target`` from ``features``."""
    x = torch.tensor([[1.0, *f] for f in features], dtype=torch.float64)
    y = torch.tensor(target, dtype=torch.float64)
    predictions = []
    for i in range(len(target)):
        keep = torch.arange(len(target)) != i
        coef = torch.linalg.lstsq(x[keep], y[keep, None]).solution[:, 0]
        predictions.append(float(x[i] @ coef))
    return r_squared(predictions, target)


def analyse(records, name, qualities, kept_by_quality: dict[float, float]) -> None:
    """How well can a context's tolerated retention be predicted, and would a better predictor beat the fixed ratio?

    Pearson r of each feature with the measured best retention and leave-one-out R² of small linear predictors; then,
    for each feature set, a linear predictor of the best retention fitted on one half of the contexts and applied to
    the other (2-fold cross-fitting, folds by a seeded shuffle), shifted by one constant so that its mean kept
    fraction equals the calibrated press's at that target (``kept_by_quality``): its score minus the fixed ratio's at
    the same mean, paired over contexts."""
    from kvpress_like.calibration import FEATURES
    from kvpress_like.eval.stats import paired_difference

    sets = {"context_nll": ["context_nll"], "context_nll + log_length": ["context_nll", "log_length"],
            "all features": list(FEATURES)}
    print(f"\n{name}: measured best retention (smallest grid retention with NLL-quality >= target) against "
          f"context features, {len(records)} contexts")
    print("| quality target | mean best retention | " + " | ".join(f"r({f})" for f in FEATURES)
          + " | LOO R² (context_nll) | LOO R² (all features) | " + " | ".join(f"cross-fitted {k} − fixed" for k in sets)
          + " |")
    print("|---:|---:|" + "---:|" * (len(FEATURES) + 2) + "---|" * len(sets))
    grid = [c["retention"] for c in records[0]["grid"][name]]
    for quality in qualities:
        best = [measured_best(r, name, quality) for r in records]
        columns = {f: [r["features"][name][f] for r in records] for f in FEATURES}
        rs = " | ".join(f"{pearson(columns[f], best):+.2f}" for f in FEATURES)
        single = loo_r_squared([[v] for v in columns["context_nll"]], best)
        every = loo_r_squared([[columns[f][i] for f in FEATURES] for i in range(len(records))], best)
        cells = []
        for features in sets.values():
            predicted = cross_fitted([[columns[f][i] for f in features] for i in range(len(records))], best)
            chosen = shifted_choice(records, name, grid, predicted, kept_by_quality[quality])
            mean_kept = sum(cell_value(r, name, x, "kept") for r, x in zip(records, chosen)) / len(records)
            fixed = fixed_retention_for(records, name, mean_kept)
            d = paired_difference([cell_value(r, name, x, "score") for r, x in zip(records, chosen)],
                                  [cell_value(r, name, fixed, "score") for r in records])
            cells.append(f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] (kept {mean_kept:.3f})")
        print(f"| {quality:g} | {sum(best) / len(best):.3f} | {rs} | {single:.2f} | {every:.2f} | "
              + " | ".join(cells) + " |")


def cross_fitted(features: list[list[float]], target: list[float], seed: int = 0) -> list[float]:
    """Predictions of ``target`` by least squares (with intercept) fitted on the other half of a seeded 2-fold split."""
    order = list(range(len(target)))
    random.Random(seed).shuffle(order)
    folds = [order[::2], order[1::2]]
    x = torch.tensor([[1.0, *f] for f in features], dtype=torch.float64)
    y = torch.tensor(target, dtype=torch.float64)
    predicted = [0.0] * len(target)
    for k in (0, 1):
        train = torch.tensor(folds[1 - k])
        coef = torch.linalg.lstsq(x[train], y[train, None]).solution[:, 0]
        for i in folds[k]:
            predicted[i] = float(x[i] @ coef)
    return predicted


def shifted_choice(records, name, grid, predicted: list[float], mean_kept: float) -> list[float]:
    """Grid retentions nearest to ``predicted + c``, with the constant ``c`` found by bisection so that the mean kept
    fraction is ``mean_kept`` (as near as the grid allows)."""
    low, high = -1.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        chosen = [nearest(grid, min(1.0, max(0.05, p + mid))) for p in predicted]
        kept = sum(cell_value(r, name, x, "kept") for r, x in zip(records, chosen)) / len(records)
        low, high = (mid, high) if kept < mean_kept else (low, mid)
    return [nearest(grid, min(1.0, max(0.05, p + high))) for p in predicted]


def r_squared(predicted: list[float], measured: list[float]) -> float:
    mean = sum(measured) / len(measured)
    total = sum((m - mean) ** 2 for m in measured)
    residual = sum((m - p) ** 2 for p, m in zip(predicted, measured))
    return 1 - residual / total if total else math.nan


def report(args) -> None:
    from kvpress_like.calibration import SHIPPED_DIR, load_calibration, quality_model_for
    from kvpress_like.eval.runner import read_jsonl
    from kvpress_like.eval.stats import paired_difference

    records = [r for path in args.results for r in read_jsonl(Path(path))]
    if not records:
        sys.exit(f"no records in {args.results}")
    source = args.calibration or SHIPPED_DIR / "smollm2-135m-instruct.json"
    data = load_calibration(source)
    names = list(records[0]["grid"])
    lengths = sorted({r["length"] for r in records})
    tasks = sorted({r["task"] for r in records})
    print(f"{len(records)} contexts ({', '.join(map(str, lengths))} tokens; tasks {', '.join(tasks)}); "
          f"calibration {source}\n")
    print("| press | quality target | kept (mean) | score calibrated | score fixed | calibrated − fixed (points) "
          "| 95 % CI | score oracle | oracle − fixed | share of oracle gain | NLL-q calibrated | NLL-q fixed "
          "| NLL-q diff | 95 % CI | R² / r (predicted vs best retention) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    rows = []
    for name in names:
        model = quality_model_for(data, name, str(source))
        grid = [c["retention"] for c in records[0]["grid"][name]]
        for quality in args.quality:
            predicted = [min(1.0, max(0.05, model.retention(quality, r["features"][name]["context_nll"])))
                         for r in records]
            chosen = [nearest(grid, p) for p in predicted]
            kept = [cell_value(r, name, x, "kept") for r, x in zip(records, chosen)]
            mean_kept = sum(kept) / len(kept)
            fixed = fixed_retention_for(records, name, mean_kept)
            oracle = oracle_choice(records, name, mean_kept)
            out = {}
            for label, choice in (("calibrated", chosen), ("fixed", [fixed] * len(records)), ("oracle", oracle)):
                out[label, "score"] = [cell_value(r, name, x, "score") for r, x in zip(records, choice)]
                out[label, "quality"] = [cell_value(r, name, x, "quality") for r, x in zip(records, choice)]
            diff = paired_difference(out["calibrated", "score"], out["fixed", "score"])
            qdiff = paired_difference(out["calibrated", "quality"], out["fixed", "quality"])
            mean = {k: sum(v) / len(v) for k, v in out.items()}
            gain = mean["oracle", "score"] - mean["fixed", "score"]
            share = (mean["calibrated", "score"] - mean["fixed", "score"]) / gain if gain > 0 else math.nan
            best = [measured_best(r, name, quality) for r in records]
            r2, r = r_squared(predicted, best), pearson(predicted, best)
            rows.append({"press": name, "quality": quality, "mean_kept": mean_kept, "fixed_retention": fixed,
                         **{f"{k[0]}_{k[1]}": v for k, v in mean.items()}, "diff": vars(diff),
                         "quality_diff": vars(qdiff), "oracle_share": share, "r2": r2, "r": r})
            print(f"| {name} | {quality:g} | {mean_kept:.3f} | {100 * mean['calibrated', 'score']:.1f} "
                  f"| {100 * mean['fixed', 'score']:.1f} | {100 * diff.mean:+.1f} "
                  f"| [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] | {100 * mean['oracle', 'score']:.1f} "
                  f"| {100 * gain:+.1f} | {'–' if math.isnan(share) else f'{100 * share:.0f} %'} "
                  f"| {mean['calibrated', 'quality']:.3f} | {mean['fixed', 'quality']:.3f} | {qdiff.mean:+.3f} "
                  f"| [{qdiff.low:+.3f}, {qdiff.high:+.3f}] | {r2:.2f} / {r:+.2f} |")
    for name in names:
        analyse(records, name, args.quality, {row["quality"]: row["mean_kept"] for row in rows if row["press"] == name})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot(records, names, rows, args.plot)


def plot(records, names, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for number, name in enumerate(names):
        grid = [c["retention"] for c in records[0]["grid"][name]]
        kept = [sum(cell_value(r, name, x, "kept") for r in records) / len(records) for x in grid]
        score = [100 * sum(cell_value(r, name, x, "score") for r in records) / len(records) for x in grid]
        ax.plot(kept, score, marker=".", label=f"{name}: fixed ratio", color=f"C{number}")
        mine = [row for row in rows if row["press"] == name]
        ax.scatter([row["mean_kept"] for row in mine], [100 * row["calibrated_score"] for row in mine], marker="o",
                   s=60, color=f"C{number}", edgecolor="black", label=f"{name}: calibrated (targets)", zorder=3)
        ax.scatter([row["mean_kept"] for row in mine], [100 * row["oracle_score"] for row in mine], marker="*",
                   s=90, color=f"C{number}", label=f"{name}: oracle (hindsight)", zorder=3)
    ax.set(xlabel="mean kept fraction of the context's KV pairs", ylabel="task score (%)",
           title=f"calibrated vs fixed ratio, {len(records)} held-out contexts")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer held-out contexts at every grid retention (resumable)")
    r.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    r.add_argument("--tasks", nargs="+", default=TASKS)
    r.add_argument("--samples", type=int, default=8, help="samples per task and length")
    r.add_argument("--seed", type=int, default=0, help="seed of the held-out samples (calibration: 1,000,003)")
    r.add_argument("--presses", nargs="+", default=["compactor"])
    r.add_argument("--grid", type=float, nargs="+", default=GRID, help="retentions (kept fractions asked)")
    r.add_argument("--max-new-tokens", type=int, default=24, help="decoding budget cap (default 24)")
    r.add_argument("--batch", type=int, default=16, help="grid rows decoded together (lower: less memory)")
    r.add_argument("--output", required=True, help="JSON lines file (appended; resumable)")
    r.set_defaults(func=run)
    p = sub.add_parser("report", help="the paired comparison table from a run's records")
    p.add_argument("results", nargs="+", help="JSON lines files of run")
    p.add_argument("--quality", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    p.add_argument("--calibration", help="calibration file (default: the one shipped for the embedded model)")
    p.add_argument("--plot", help="PNG path for the score-vs-kept plot")
    p.add_argument("--json", help="write the table's rows as JSON")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
