"""Step 1 of issue 18: serve the embedded SmolLM2-135M with vLLM's CPU build, offline, and time it at 2k tokens.

Prints the time to first token (a ``max_tokens=1`` request: the prefill) and decode tokens/s (the extra time of a
``max_tokens=1 + N`` request over the first), the median of ``--repeats`` runs, prefix caching off so every request
prefills again. Run with the vLLM venv:  /work/vllm-venv/bin/python benchmarks/vllm/feasibility.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    common.set_cpu_env(threads=args.threads)
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    directory = common.model_dir()
    llm = LLM(model=str(directory), dtype="float32", max_model_len=4096, enable_prefix_caching=False,
              max_num_seqs=4, seed=0)
    print(f"engine ready after {time.perf_counter() - started:.1f} s")
    tokenizer = llm.get_tokenizer()
    prompt, answers = common.niah_prompts(tokenizer, args.length - 16, 1)[0]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    first, full = [], []
    text = ""
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(max_tokens=1 + args.new_tokens, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)
        full.append(time.perf_counter() - t0)
        text = out[0].outputs[0].text
    ttft = statistics.median(first)
    decode = args.new_tokens / (statistics.median(full) - ttft)
    print(f"prompt tokens: {n_prompt}; threads: {args.threads}")
    print(f"time to first token: {ttft:.2f} s (runs: {', '.join(f'{t:.2f}' for t in first)})")
    print(f"decode: {decode:.1f} tokens/s ({args.new_tokens} tokens; whole runs: "
          f"{', '.join(f'{t:.2f}' for t in full)} s)")
    print(f"answer: {text[:80]!r}; expected: {answers}")


if __name__ == "__main__":
    main()
