"""Answer prepared samples with NVIDIA kvpress; run by ``compare_kvpress.py`` inside kvpress's own virtual environment.

This script imports only torch, transformers and kvpress (never kvpress_like, whose transformers floor kvpress's pin
excludes). It reads JSON lines ``{"index", "task", "context_ids", "suffix_ids", "max_new_tokens"}`` (token ids made
by kvpress_like's ``encode_prompt``), prefills ``context_ids`` under the kvpress press at each ratio (the question
is not seen), then decodes the answer to ``suffix_ids`` greedily with kvpress's own pipeline, and writes one JSON
line per (sample, ratio): ``{"index", "task", "ratio", "answer_ids", "kept", "seconds"}``.

    KVPRESS_PYTHON benchmarks/kvpress_worker.py --input samples.jsonl --output answers.jsonl \\
        --press CompactorPress --ratios 0.5 0.75 0.9 --model-dir DIR --gguf-file FILE
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--press", default="CompactorPress", help="a press class of kvpress.presses")
    parser.add_argument("--ratios", nargs="+", type=float, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--gguf-file", required=True)
    args = parser.parse_args(argv)

    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    press_class = getattr(kvpress, args.press)
    samples = [json.loads(line) for line in open(args.input, encoding="utf-8")]
    with open(args.output, "a", encoding="utf-8") as sink, torch.no_grad():
        for sample in samples:
            context_ids = torch.tensor([sample["context_ids"]])
            suffix_ids = torch.tensor(sample["suffix_ids"])
            for ratio in args.ratios:
                start = time.perf_counter()
                press = press_class(compression_ratio=ratio)
                cache = DynamicCache()
                # kvpress's own query-agnostic flow: context prefilled under the press, then the question decoded
                answer = pipe._forward({"context_ids": context_ids, "questions_ids": [suffix_ids]},
                                       max_new_tokens=sample["max_new_tokens"], press=press, cache=cache)[0]
                kept = cache.get_seq_length() / context_ids.shape[1]
                answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
                sink.write(json.dumps({"index": sample["index"], "task": sample["task"], "ratio": ratio,
                                       "answer": answer, "answer_ids": answer_ids, "kept": kept,
                                       "seconds": round(time.perf_counter() - start, 3)}) + "\n")
                sink.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
