"""Fast paired ablation of press variants on task samples, scored by the teacher-forced gold answer.

For each sample, one full prefill of the context records every press's scores (as ``kvpress-like eval`` does); every
(press, ratio) cell then compresses a copy of that cache and runs one forward over the question and the gold answer.
A cell scores 1 when the model's argmax reproduces every token of the gold answer (the greedy answer then starts
with it) and records the answer's mean NLL. This costs one forward per cell instead of a greedy decode, so many
variants can be compared on the same samples; confirm the winner with ``kvpress-like eval`` (greedy answers).

    python benchmarks/answer_ablation.py --presses compactor "compactor:n_sink=8,window=4" \\
        --ratios 0.5 0.75 0.9 --tasks niah_single_2 --length 2048 --samples 50 --seed 100 --output dev.jsonl

Prints, per task and ratio, each press's match rate with its Wilson 95 % interval and the paired difference to the
first press (bootstrap 95 % interval), and the mean answer NLL. Results are appended to ``--output`` (JSON lines)
and reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presses", nargs="+", required=True)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--tasks", nargs="+", default=["niah_single_2"])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from kvpress_like.cache import CACHE_KWARG
    from kvpress_like.context import press
    from kvpress_like.eval import load_default_model
    from kvpress_like.eval.fidelity import token_nll
    from kvpress_like.eval.runner import PressSpec, SharedPrefill, load_results, prefill, stack_caches, stackable_groups
    from kvpress_like.eval.stats import paired_difference, wilson_interval
    from kvpress_like.eval.tasks import generate_samples
    from kvpress_like.pipeline import encode_prompt

    path = Path(args.output)
    done = {(r["press"], r["ratio"], r["task"], r["index"]) for r in load_results(path).values()
            if r["length"] == args.length and r["seed"] == args.seed}
    specs = [PressSpec.parse(s) for s in args.presses]
    model, tokenizer = load_default_model()
    shared = SharedPrefill(model, specs, args.ratios)
    cells = [(s.label, r) for s in specs for r in args.ratios]
    with path.open("a", encoding="utf-8") as sink:
        for task in args.tasks:
            for sample in generate_samples(task, tokenizer, args.length, args.samples, seed=args.seed):
                todo = [c for c in cells if (*c, task, sample.index) not in done]
                if not todo:
                    continue
                context_ids, suffix_ids = encode_prompt(tokenizer, sample.context, sample.question,
                                                        sample.answer_prefix)
                answer = tokenizer(" " + sample.answers[0], add_special_tokens=False, return_tensors="pt").input_ids
                follow = torch.cat([suffix_ids, answer], dim=1)
                with torch.no_grad(), press(model, shared.recorder):
                    full = prefill(model, context_ids)
                    for ratio in sorted({r for _, r in todo}):
                        labels = [label for label, r in todo if r == ratio]
                        caches = [shared.cache_for(full, label, ratio) for label in labels]
                        for group in stackable_groups(caches):  # cells whose caches stack into one batch: one forward
                            stacked = stack_caches([caches[i] for i in group]) if len(group) > 1 else caches[group[0]]
                            ids = follow.expand(len(group), -1)
                            logits = model(input_ids=ids, **{CACHE_KWARG: stacked}).logits
                            logits = logits[:, suffix_ids.shape[1] - 1:-1]
                            for row, i in enumerate(group):
                                record = {"key": json.dumps([labels[i], ratio, task, args.length, sample.index,
                                                             args.seed]),
                                          "press": labels[i], "ratio": ratio, "task": task, "length": args.length,
                                          "index": sample.index, "seed": args.seed,
                                          "match": float(bool((logits[row].argmax(-1) == answer[0]).all())),
                                          "nll": float(token_nll(logits[row], answer[0]).mean())}
                                sink.write(json.dumps(record) + "\n")
                        sink.flush()
                print(f"{task} #{sample.index} done", file=sys.stderr, flush=True)

    records = [r for r in load_results(path).values() if r["length"] == args.length and r["seed"] == args.seed]
    for task in args.tasks:
        for ratio in args.ratios:
            by_press = {s.label: {r["index"]: r for r in records
                                  if r["press"] == s.label and r["ratio"] == ratio and r["task"] == task}
                        for s in specs}
            base = specs[0].label
            print(f"\n{task}, length {args.length}, ratio {ratio:g}, seed {args.seed}")
            print("| press | n | match % | 95 % CI | vs first (pp) | 95 % CI | mean NLL |")
            print("|---|---:|---:|---|---:|---|---:|")
            for label, rows in by_press.items():
                matches = [rows[i]["match"] for i in sorted(rows)]
                low, high = wilson_interval(sum(matches), len(matches))
                shared_ids = sorted(set(rows) & set(by_press[base]))
                diff = paired_difference([rows[i]["match"] for i in shared_ids],
                                         [by_press[base][i]["match"] for i in shared_ids])
                nll = sum(r["nll"] for r in rows.values()) / max(len(rows), 1)
                print(f"| {label} | {len(matches)} | {100 * sum(matches) / max(len(matches), 1):.1f} "
                      f"| [{100 * low:.1f}, {100 * high:.1f}] | {100 * diff.mean:+.1f} "
                      f"| [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] | {nll:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
