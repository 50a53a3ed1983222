"""Issue 18, step 4: presses inside vLLM's CPU build (kvpress_like.integrations.vllm), on the embedded SmolLM2-135M.

Run with the vLLM venv (benchmarks/vllm/setup_venv.sh). One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``distributed_executor_backend="uni"``) serves every condition; :func:`kvpress_like.integrations.vllm.install`
switches the press between requests.

* ``answers``: greedy answers to ``--n`` single-needle prompts of ``--length`` tokens per press, with the KV blocks
  the request holds after its prefill step and after its first decode step (when the evicted blocks are back in the
  pool). Writes the prompts' token ids and the answers to ``--out`` (JSON), which
  ``benchmarks/vllm/transformers_answers.py`` (project environment) reads to compare with the transformers path.
* ``concurrency``: a fixed KV budget of ``--budget-requests`` uncompressed requests (``--length`` prompt tokens +
  ``--new-tokens`` generated, in blocks of ``--block-size``); ``--submit`` requests are queued at once and the engine
  is stepped to the end; prints the peak number of requests running at once and the preemptions, per press.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PRESSES = {"none": None, "knorm": {"press": "knorm"}, "compactor": {"press": "compactor"}}


def build_engine(args, num_blocks: int | None = None):
    common.set_cpu_env(threads=args.threads)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from kvpress_like.integrations import vllm as integration

    integration.install(None)  # patches in place, no press yet (the entry point also runs when the env var is set)
    extra = {"num_gpu_blocks_override": num_blocks} if num_blocks else {}
    llm = LLM(model=str(common.model_dir()), dtype="float32", max_model_len=args.length + args.new_tokens + 64,
              enable_prefix_caching=False, enforce_eager=True, seed=0, distributed_executor_backend="uni",
              async_scheduling=False, max_num_batched_tokens=max(4096, args.length + 64), block_size=args.block_size,
              enable_chunked_prefill=False,  # a prompt split over two steps would stay uncompressed
              max_num_seqs=args.max_num_seqs, **extra)
    return llm, integration


def press_for(name: str, ratio: float):
    spec = PRESSES[name]
    if spec is None:
        return None
    from kvpress_like.registry import press_from_dict

    return press_from_dict({**spec, "ratio": ratio})


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def run_answers(args) -> None:
    from vllm import SamplingParams

    llm, integration = build_engine(args)
    tokenizer = llm.get_tokenizer()
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    samples = common.niah_prompts(tokenizer, args.length, args.n, seed=args.seed)
    records = []
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    for index, (text, answers) in enumerate(samples):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        record = {"index": index, "prompt_ids": ids, "answers": list(answers), "runs": {}}
        for name in args.presses:
            integration.install(press_for(name, args.ratio))
            llm.llm_engine.add_request(f"{name}-{index}", {"prompt_token_ids": ids}, params)
            used, started, output = [], time.perf_counter(), None
            while llm.llm_engine.has_unfinished_requests():
                for out in llm.llm_engine.step():
                    if out.finished:
                        output = out
                used.append(total - pool.get_num_free_blocks())
            run = {"text": output.outputs[0].text, "token_ids": list(output.outputs[0].token_ids),
                   "blocks_after_prefill": used[0], "blocks_after_first_decode": used[1] if len(used) > 1 else None,
                   "seconds": round(time.perf_counter() - started, 2)}
            record["runs"][name] = run
            print(f"sample {index} {name:9s} blocks {run['blocks_after_prefill']:3d} -> "
                  f"{run['blocks_after_first_decode']}  {run['seconds']:6.1f} s  {run['text'][:40]!r}  "
                  f"(expected {answers[0]})", flush=True)
        records.append(record)
        result = {"length": args.length, "ratio": args.ratio, "new_tokens": args.new_tokens,
                  "block_size": args.block_size, "presses": args.presses, "samples": records}
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")  # after every sample: a partial run counts
    integration.install(None)
    print(f"wrote {args.out}")


def run_concurrency(args) -> None:
    from vllm import SamplingParams

    per_request = math.ceil((args.length + args.new_tokens) / args.block_size)
    budget = args.budget_requests * per_request
    llm, integration = build_engine(args, num_blocks=budget + 1)  # + vLLM's reserved null block
    tokenizer = llm.get_tokenizer()
    scheduler = scheduler_of(llm)
    print(f"KV budget: {scheduler.kv_cache_manager.block_pool.get_num_free_blocks()} free blocks of "
          f"{args.block_size} tokens ({args.budget_requests} uncompressed requests of {per_request} blocks)")
    samples = common.niah_prompts(tokenizer, args.length, args.submit, seed=args.seed)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in samples]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    peaks = {}
    for name in args.presses:
        integration.install(press_for(name, args.ratio))
        for i, ids in enumerate(prompts):
            llm.llm_engine.add_request(f"{name}-{i}", {"prompt_token_ids": ids}, params)
        peak, steps, preempted, started = 0, 0, set(), time.perf_counter()
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
            steps += 1
            running = scheduler.running
            peak = max(peak, len(running))
            preempted |= {r.request_id for r in running if getattr(r, "num_preemptions", 0)}
        peaks[name] = peak
        print(f"{name:9s} peak concurrent requests {peak:3d}  preempted {len(preempted)}  steps {steps}  "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    integration.install(None)
    if "none" in peaks:
        for name, peak in peaks.items():
            print(f"{name:9s} {peak / peaks['none']:.2f}x the requests of no press")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["answers", "concurrency"])
    parser.add_argument("--presses", nargs="+", default=["none", "knorm", "compactor"], choices=list(PRESSES))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=32)  # CPU attention: multiples of 32
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--budget-requests", type=int, default=12)
    parser.add_argument("--submit", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="vllm_answers.json")
    args = parser.parse_args()
    (run_answers if args.mode == "answers" else run_concurrency)(args)


if __name__ == "__main__":
    main()
