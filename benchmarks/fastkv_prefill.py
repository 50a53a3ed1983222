"""FastKV prefill speed on the embedded SmolLM2-135M: full model vs FastKV, side by side in one run.

For each ``--lengths`` (4,096 and 8,192 tokens of the essays by default) the script times, in turn and ``--repeats``
times (the order of the arms rotates every repeat), one prefill (``logits_to_keep=1``, as ``generate`` does, on a fresh
``DynamicCache``) of:

* ``full``: no press;
* ``fastkv``: ``FastKVPress(ratio=--ratio)`` with its defaults (token-selective propagation past layer
  ``30 * 15 // 32 = 14`` of ``tsp_rate = max(0.2, 1 - ratio)`` of the tokens);
* ``fastkv_no_tsp`` (unless ``--skip-no-tsp``): the same press with ``tsp_rate=1`` (every token propagated: only the
  scoring and KV selection), which shows what the propagation itself saves.

It prints each arm's median CPU seconds of the process (``time.process_time``: with one thread, what the prefill
computes, little affected by other processes competing for the cores) and the speed-up ``median(full) / median(arm)``
with the range of the per-repeat ratios (each repeat's arms ran back to back), then the same for wall-clock seconds
(which other processes on a shared machine disturb). Run with ``OMP_NUM_THREADS=1``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fastkv_prefill.py
    OMP_NUM_THREADS=1 python benchmarks/fastkv_prefill.py --lengths 1024 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import context_ids, load_average, machine_line
from transformers import DynamicCache

from kvpress_like import press
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.compressors.fastkv import FastKVPress
from kvpress_like.eval.model import load_model


def prefill_seconds(model, ids, p) -> tuple[float, float]:
    """``(cpu, wall)`` seconds of one prefill of ``ids`` ``[1, S]`` (under press ``p`` unless ``None``)."""
    cache = DynamicCache(config=model.config)
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if p is None:
            logits = model(input_ids=ids, logits_to_keep=1, **{CACHE_KWARG: cache}).logits
        else:
            with press(model, p):
                logits = model(input_ids=ids, logits_to_keep=1, **{CACHE_KWARG: cache}).logits
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if torch.isnan(logits).any():
        raise SystemExit("the last-token logits are NaN")
    return cpu, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--skip-no-tsp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_model("default")
    print(machine_line())
    arms = {"full": None, "fastkv": FastKVPress(ratio=args.ratio)}
    if not args.skip_no_tsp:
        arms["fastkv_no_tsp"] = FastKVPress(ratio=args.ratio, tsp_rate=1.0)
    print("presses: " + "; ".join(f"{name} = {p!r}" for name, p in arms.items()))
    warm = context_ids("essays", 256, model.config.vocab_size, tokenizer, args.seed)
    for p in arms.values():
        prefill_seconds(model, warm, p)
    names = list(arms)
    for length in args.lengths:
        ids = context_ids("essays", length, model.config.vocab_size, tokenizer, args.seed)
        cpu, wall = {name: [] for name in names}, {name: [] for name in names}
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                c, w = prefill_seconds(model, ids, arms[name])
                cpu[name].append(c)
                wall[name].append(w)
            print(f"  {length} tokens, repeat {repeat + 1} (order {', '.join(order)}): "
                  + ", ".join(f"{n} cpu {cpu[n][-1]:.2f} s / wall {wall[n][-1]:.2f} s" for n in names)
                  + f" (load average {load_average():.2f})", flush=True)
        for clock, times in (("cpu", cpu), ("wall", wall)):
            full = statistics.median(times["full"])
            for name in names:
                median = statistics.median(times[name])
                ratios = [f / t for f, t in zip(times["full"], times[name])]
                print(f"{length:>6} tokens  {clock:<4}  {name:<14} median {median:7.2f} s  speed-up vs full "
                      f"{full / median:5.2f}x (per repeat {min(ratios):.2f}-{max(ratios):.2f}x, n = {len(ratios)})")


if __name__ == "__main__":
    main()
