"""Scoring overhead of every press on the embedded SmolLM2-135M model, measured side by side with plain prefill.

For each context length and each press, the same random-token context is prefilled back to back without a press and
with the press at ``--ratio`` (0.5 by default), alternating, ``--repeats`` times; the minimum of each is kept (the
minimum is the measurement least disturbed by other processes on a shared machine). Reported per press:

* ``scoring/plain``: wall time spent inside the press (score + allocate + select + store, timed around
  ``Press.compress`` in every layer) as a fraction of the plain prefill time;
* ``press/plain - 1``: end-to-end prefill slowdown (includes timer noise of two separate runs).

Within each repeat the presses run one after the other, each right after its own plain prefill, so presses are compared
under the same load. KVzip selects after an extra reconstruction forward over the cached context instead of inside
``Press.compress``, so its ``scoring`` column reads ``-`` and its cost is the whole slowdown. When both ``kvzip`` and
``compactor`` are benchmarked, a line compares them per repeat: each one's prefill time over its plain prefill, and
KVzip's prefill time over Compactor's in the same repeat (range over the repeats).

Then ChunkKV with ``reuse_group=1`` vs ``reuse_group=4`` (prefill-time ratio and in-press time of each).

Usage::

    python benchmarks/scoring_overhead.py                                  # all presses, 2048, 8192 and 16384 tokens
    python benchmarks/scoring_overhead.py --lengths 4096
    python benchmarks/scoring_overhead.py --lengths 16384 --presses compactor snapkv knorm

Benchmarks print ratios measured in one run, not absolute times to compare across machines. Run it alone: when other
processes compete for the cores (the ``load`` column, the 1-minute load average, well above the thread count), torch's
OpenMP threads stall and the many small operations of a scorer slow down far more than the prefill's large matrix
products, which inflates ``scoring/plain`` several-fold. ``--threads 1`` is much less sensitive to that.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from common import load_average, machine_line, parse_press
from transformers import DynamicCache

import kvpress_like
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.eval.model import load_default_model


def prefill(model, ids: torch.Tensor) -> tuple[float, DynamicCache]:
    """Wall time of one prefill (only the last position's logits are computed) and the resulting cache."""
    cache = DynamicCache(config=model.config)
    gc.collect()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, cache


def timed_press(p):
    """Wrap ``p.compress`` (instance attribute) to accumulate its wall time in ``p._bench_seconds``."""
    original = p.compress
    p._bench_seconds = 0.0
    p._bench_calls = 0

    def compress(ctx):
        start = time.perf_counter()
        p._bench_calls += 1
        try:
            return original(ctx)
        finally:
            p._bench_seconds += time.perf_counter() - start

    p.compress = compress
    return p


def run_press(model, ids, p) -> tuple[float, float]:
    """``(prefill seconds, seconds inside the press)`` of one prefill with press ``p``; the second is NaN when the
    press did not compress through ``Press.compress`` (model-scope selection, KVzip's reconstruction forward)."""
    timed_press(p)
    with kvpress_like.press(model, p):
        seconds, cache = prefill(model, ids)
    del cache
    return seconds, p._bench_seconds if p._bench_calls else float("nan")


def make(spec: str, ratio: float):
    """The press of a spec ``name`` or ``name:key=value,...`` at ``ratio``."""
    name, kwargs = parse_press(spec)
    return kvpress_like.create_press(name, ratio=ratio, **kwargs)


def prefill_presses(requested: list[str] | None, ratio: float) -> tuple[list[str], dict[str, str]]:
    """Presses to benchmark: ``requested`` (checked), else every registered press that takes a prefill ``ratio``.

    Returns the names and, for registered presses left out, why (e.g. a decoding-time press has no ratio of its own).
    """
    registered = kvpress_like.list_presses()
    unknown = sorted({spec for spec in requested or [] if parse_press(spec)[0] not in registered})
    if unknown:
        raise SystemExit(f"unknown press(es) {unknown}; registered: {registered}")
    names, skipped = [], {}
    for name in requested or registered:
        try:
            make(name, ratio)
        except (TypeError, ValueError) as error:
            if requested:
                raise SystemExit(f"press {name!r} cannot be created with ratio={ratio}: {error}") from error
            skipped[name] = str(error)
            continue
        names.append(name)
    return names, skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384],
                        help="context lengths in tokens (default: 2048 8192 16384; e.g. --lengths 4096 for 4k only)")
    parser.add_argument("--presses", nargs="+", default=None, help="press names (default: every registered press)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the KV pairs removed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-chunkkv-reuse", action="store_true", help="skip the ChunkKV reuse_group comparison")
    parser.add_argument("--repeats", type=int, default=2, help="alternating plain/press pairs; the minimum is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    names, skipped = prefill_presses(args.presses, args.ratio)

    print(machine_line(), flush=True)
    for name, why in skipped.items():
        print(f"skipped press {name!r} (not a prefill press with a ratio): {why}", flush=True)
    load_start = time.perf_counter()
    model = load_default_model()[0].eval()
    cfg = model.config
    print(f"model: SmolLM2-135M-Instruct ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query heads, "
          f"{cfg.num_key_value_heads} KV heads), float32, attn={cfg._attn_implementation}, "
          f"loaded in {time.perf_counter() - load_start:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    prefill(model, torch.randint(100, cfg.vocab_size, (1, 256), generator=generator))  # warm-up

    for length in args.lengths:
        ids = torch.randint(100, cfg.vocab_size, (1, length), generator=generator)
        print(f"\n## context {length} tokens, ratio {args.ratio}, random tokens; min of {args.repeats} alternating "
              "plain/press prefills", flush=True)
        header = f"| {'press':<22} | plain s | press s | scoring s | scoring/plain | press/plain - 1 | load |"
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
        prefill(model, ids)  # warm-up at this length
        results, runs = {}, {name: [] for name in names}
        for _ in range(args.repeats):  # presses interleaved within each repeat: compared under the same load
            for name in names:
                plain, _ = prefill(model, ids)
                runs[name].append((plain, *run_press(model, ids, make(name, args.ratio))))
        for name in names:
            plain, pressed, scoring = (min(column) for column in zip(*runs[name], strict=True))
            results[name] = (plain, pressed, scoring)
            timed = scoring == scoring  # NaN: not timed inside Press.compress
            in_press = f"{scoring:9.3f} | {scoring / plain:12.1%}" if timed else f"{'-':>9} | {'-':>12}"
            print(f"| {name:<22} | {plain:7.2f} | {pressed:7.2f} | {in_press} | "
                  f"{pressed / plain - 1:+14.1%} | {load_average():4.1f} |", flush=True)
        if "kvzip" in results and "compactor" in results:
            pairs = [(kv[1] / kv[0], co[1] / co[0], kv[1] / co[1]) for kv, co in zip(runs["kvzip"], runs["compactor"])]
            kv_ratio, co_ratio, kv_co = (sorted(column) for column in zip(*pairs))
            print(f"kvzip vs compactor at {length} tokens, per repeat (min-max over {len(pairs)}): prefill/plain "
                  f"kvzip {kv_ratio[0]:.2f}-{kv_ratio[-1]:.2f}x, compactor {co_ratio[0]:.2f}-{co_ratio[-1]:.2f}x; "
                  f"kvzip/compactor prefill {kv_co[0]:.2f}-{kv_co[-1]:.2f}x", flush=True)
        if "compactor" in results:
            plain, _, scoring = results["compactor"]
            verdict = "OK" if scoring / plain <= 0.05 else "ABOVE TARGET"
            print(f"target check: compactor scoring = {scoring / plain:.1%} of plain prefill at {length} tokens "
                  f"(target <= 5 %): {verdict}", flush=True)
        if not args.no_chunkkv_reuse and "chunkkv" in kvpress_like.list_presses():
            runs = []
            for _ in range(args.repeats):
                plain, _ = prefill(model, ids)
                one = run_press(model, ids, kvpress_like.create_press("chunkkv", ratio=args.ratio, reuse_group=1))
                four = run_press(model, ids, kvpress_like.create_press("chunkkv", ratio=args.ratio, reuse_group=4))
                runs.append((plain, *one, *four))
            plain, t1, s1, t4, s4 = (min(column) for column in zip(*runs, strict=True))
            print(f"chunkkv reuse: plain {plain:.2f} s | reuse_group=1 prefill {t1:.2f} s (in press {s1:.3f} s) | "
                  f"reuse_group=4 prefill {t4:.2f} s (in press {s4:.3f} s) | prefill ratio reuse4/reuse1 = "
                  f"{t4 / t1:.3f} | in-press ratio = {s4 / max(s1, 1e-9):.3f}", flush=True)


if __name__ == "__main__":
    main()
