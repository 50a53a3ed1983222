"""Query-agnostic needle accuracy of every press on the embedded SmolLM2-135M model.

The context (a needle in Paul Graham essays) is compressed before the question is seen; the question comes after.
Prints, per press, allocator and ratio, the fraction of needle depths answered and the KV bytes after compression
(measured side by side with the full cache in the same run).

    python benchmarks/needle_accuracy.py --length 2048 --ratios 0.5 0.75
    python benchmarks/needle_accuracy.py --presses compactor --allocators uniform head_adaptive kvcompose --ratios 0.75
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import transformers

import kvpress_like
from kvpress_like.cli import run_job
from kvpress_like.eval.model import load_default_model
from kvpress_like.eval.sample import build_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", nargs="+", default=[p for p in kvpress_like.list_presses() if p != "decoding"])
    parser.add_argument("--allocators", nargs="+", default=["uniform"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.35, 0.6, 0.85])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    print(f"# {platform.platform()} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"threads {torch.get_num_threads()}")
    model, tokenizer = load_default_model()
    samples = [build_sample(tokenizer, length=args.length, depth=d) for d in args.depths]
    rows = []

    def trial(label: str, p) -> None:
        start = time.perf_counter()
        hits, after, before = 0, 0, 0
        for sample in samples:
            result = run_job(model, tokenizer, p, sample.context, sample.question, args.max_new_tokens, progress=False)
            hits += sample.answer in result.answer
            after, before = result.bytes_after, result.bytes_before
        rows.append((label, hits / len(samples), after / before, time.perf_counter() - start))
        print(f"{label:<48} acc {hits}/{len(samples)}  kv {after / 2**20:7.2f} MiB ({after / before:.3f} of full)",
              flush=True)

    trial("full cache", kvpress_like.KnormPress(ratio=0.0))
    for name in args.presses:
        for allocator in args.allocators:
            for ratio in args.ratios:
                trial(f"{name} / {allocator} / ratio {ratio}", kvpress_like.create_press(name, ratio=ratio,
                                                                                      allocator=allocator))
    print("\n| press / allocator / ratio | needle accuracy | KV bytes vs full |\n|---|---|---|")
    for label, accuracy, fraction, _ in rows:
        print(f"| {label} | {accuracy:.2f} | {fraction:.3f} |")


if __name__ == "__main__":
    main()
