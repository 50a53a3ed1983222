"""Context-calibrated Compactor versus fixed-ratio Compactor at the same average kept fraction.

On evaluation samples (seed 0; calibration used seed 1,000,003, so no sample is shared, and several task types were
never used for fitting), for each context length: one prefill per sample records Compactor's scores and the context's
NLL; the calibrated press's ratio for that context is derived from the shipped (or ``--calibration``) parameters;
the fixed press uses one ratio for every sample, ``1 - mean kept fraction`` of the calibrated one. Both caches are
built from the same recorded scores, then each answers greedily; the full cache answers too.

Reported per length and quality target (``--quality``; several share the prefills): mean kept fraction, task score
(RULER string match) of full / calibrated / fixed, the score relative to the full cache's, and the NLL-ratio
quality (``NLL(answer | full) / NLL(answer | compressed)``, the quality the calibration predicts) averaged over
samples.

Usage::

    python benchmarks/calibration_eval.py                                   # 2048 and 4096 tokens
    python benchmarks/calibration_eval.py --lengths 1024 --samples 1 --tasks niah_single_2   # a quick check
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import transformers

import kvpress_like
from kvpress_like.calibration import (
    QualityModel,
    _ScoreRecorder,
    answer_nll,
    load_calibration,
    model_fingerprint,
    quality_model_for,
    shipped_calibration,
)
from kvpress_like.context import press as press_context
from kvpress_like.eval.metrics import score
from kvpress_like.eval.model import load_model
from kvpress_like.eval.runner import _prompt_ids, prefill
from kvpress_like.eval.tasks import generate_samples
from kvpress_like.pipeline import answer_on_cache, kept_fraction

TASKS = ["niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "vt", "qa_1", "qa_2"]


def answer(model, tokenizer, cache, context_ids, suffix_ids, sample, max_new_tokens):
    ids = answer_on_cache(model, copy.deepcopy(cache), context_ids, suffix_ids, max_new_tokens)
    prediction = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return score(sample.metric, prediction, sample.answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--samples", type=int, default=3, help="samples per task and length")
    parser.add_argument("--quality", type=float, nargs="+", default=[0.95], help="quality targets (one row each)")
    parser.add_argument("--press", default="compactor")
    parser.add_argument("--calibration", help="parameter file (default: the shipped one)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, kvpress-like {kvpress_like.__version__}")
    model, tokenizer = load_model("default")
    if args.calibration:
        data, source = load_calibration(args.calibration), args.calibration
    else:
        source, data = shipped_calibration(model_fingerprint(model))
    fitted: QualityModel = quality_model_for(data, args.press, str(source))
    print(f"press {args.press}, qualities {args.quality}, parameters alpha={fitted.alpha:.4f} "
          f"beta={fitted.beta:.4f} from {source}")
    recorder = _ScoreRecorder(scorer=kvpress_like.create_press(args.press))
    label = recorder.scorer.name
    rows = []
    for length in args.lengths:
        runs = []
        with torch.no_grad(), press_context(model, recorder):
            for task in args.tasks:
                for sample in generate_samples(task, tokenizer, length, args.samples, seed=0):
                    context_ids, suffix_ids = _prompt_ids(tokenizer, sample, "query_agnostic", model.device)
                    answer_ids = tokenizer(" " + ", ".join(sample.answers), add_special_tokens=False,
                                           return_tensors="pt")["input_ids"]
                    full = prefill(model, context_ids)
                    nll_full = answer_nll(model, copy.deepcopy(full), suffix_ids, answer_ids)
                    run = {"sample": sample, "ids": (context_ids, suffix_ids, answer_ids), "nll_full": nll_full,
                           "context_nll": recorder.nll,
                           "full": answer(model, tokenizer, full, context_ids, suffix_ids, sample, args.max_new_tokens)}
                    for quality in args.quality:
                        retention = min(1.0, max(0.05, fitted.retention(quality, recorder.nll)))
                        cache = copy.deepcopy(full)
                        recorder.compress_at(label, cache, 1.0 - retention)
                        run[quality, "kept", "calibrated"] = kept_fraction(cache)
                        run[quality, "score", "calibrated"] = answer(model, tokenizer, cache, context_ids, suffix_ids,
                                                                     sample, args.max_new_tokens)
                        run[quality, "nll", "calibrated"] = nll_full / answer_nll(model, cache, suffix_ids, answer_ids)
                    runs.append(run)
            n = len(runs)
            fixed_ratios = {quality: 1.0 - sum(r[quality, "kept", "calibrated"] for r in runs) / n
                            for quality in args.quality}
            for run in runs:  # the fixed ratios from the same scores: re-prefill to re-record them
                context_ids, suffix_ids, answer_ids = run["ids"]
                full = prefill(model, context_ids)
                for quality, ratio in fixed_ratios.items():
                    cache = copy.deepcopy(full)
                    recorder.compress_at(label, cache, ratio)
                    run[quality, "kept", "fixed"] = kept_fraction(cache)
                    run[quality, "score", "fixed"] = answer(model, tokenizer, cache, context_ids, suffix_ids,
                                                            run["sample"], args.max_new_tokens)
                    run[quality, "nll", "fixed"] = run["nll_full"] / answer_nll(model, cache, suffix_ids, answer_ids)
        mean = {key: sum(r[key] for r in runs) / n for key in runs[0] if key not in ("sample", "ids")}
        rows.append((length, n, mean))
        print(f"length {length}: done ({n} samples, mean context NLL {mean['context_nll']:.3f})", flush=True)

    print("\n| length | samples | quality target | kept (calibrated) | kept (fixed) | score full | score calibrated "
          "| score fixed | calibrated / full | fixed / full | NLL-quality calibrated | NLL-quality fixed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length, n, m in rows:
        for quality in args.quality:
            relative = [f"{100 * m[quality, 'score', k] / m['full']:.1f}%" if m["full"] else "–"
                        for k in ("calibrated", "fixed")]
            print(f"| {length} | {n} | {quality} | {m[quality, 'kept', 'calibrated']:.3f} "
                  f"| {m[quality, 'kept', 'fixed']:.3f} | {100 * m['full']:.1f} "
                  f"| {100 * m[quality, 'score', 'calibrated']:.1f} | {100 * m[quality, 'score', 'fixed']:.1f} "
                  f"| {relative[0]} | {relative[1]} | {m[quality, 'nll', 'calibrated']:.3f} "
                  f"| {m[quality, 'nll', 'fixed']:.3f} |")


if __name__ == "__main__":
    main()
