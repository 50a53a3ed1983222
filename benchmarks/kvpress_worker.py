"""Answer prepared samples with NVIDIA kvpress; run by ``compare_kvpress.py`` inside kvpress's own virtual environment.

This script imports only torch, transformers and kvpress (never kvpress_like, whose transformers floor kvpress's pin
excludes). It reads JSON lines ``{"index", "task", "context_ids", "suffix_ids", "max_new_tokens"}`` (token ids made
by kvpress_like's ``encode_prompt``), prefills ``context_ids`` under the kvpress press (the question is not seen),
then decodes the answer to ``suffix_ids`` greedily with kvpress's own ``generate_answer``, and writes one JSON line
per (sample, ratio): ``{"index", "task", "ratio", "answer", "kept", "seconds"}``.

One prefill serves every ratio: kvpress compresses each layer in a hook after that layer's attention, so the prefill's
hidden states do not depend on the ratio; the hook below calls the press's own ``compress`` once per ratio on the
same layer inputs and keeps each result in that ratio's cache (what separate runs would store; kvpress's Compactor
draws a fresh random sketch per call, so the sketches differ from a separate run's, as they differ between any two
kvpress runs; the torch seed is set per sample).

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

    import copy

    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    press_class = getattr(kvpress, args.press)
    samples = [json.loads(line) for line in open(args.input, encoding="utf-8")]
    press = press_class(compression_ratio=args.ratios[0])
    kept_by_ratio: dict[float, dict[int, tuple]] = {}

    def every_ratio(module, inputs, kwargs, output):  # in place of the press's forward_hook, prefill only
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for ratio in args.ratios:
            press.compression_ratio = ratio
            kept_by_ratio[ratio][module.layer_idx] = press.compress(module, kwargs["hidden_states"], layer.keys,
                                                                    layer.values, output[1], kwargs)
        return output

    press.forward_hook = every_ratio
    with open(args.output, "a", encoding="utf-8") as sink, torch.no_grad():
        for sample in samples:
            torch.manual_seed(sample["index"])
            start = time.perf_counter()
            context_ids = torch.tensor([sample["context_ids"]])
            suffix_ids = torch.tensor([sample["suffix_ids"]])
            kept_by_ratio.update({ratio: {} for ratio in args.ratios})
            full = DynamicCache()
            with press(model):  # as kvpress's pipeline prefills: the model without its head
                model.model(input_ids=context_ids, past_key_values=full)
            shared = (time.perf_counter() - start) / len(args.ratios)
            for ratio in args.ratios:
                start = time.perf_counter()
                cache = copy.deepcopy(full)
                for idx, (keys, values) in kept_by_ratio[ratio].items():
                    cache.layers[idx].keys, cache.layers[idx].values = keys, values
                kept = cache.get_seq_length() / context_ids.shape[1]
                answer = pipe.generate_answer(question_ids=suffix_ids, cache=cache,
                                              context_length=context_ids.shape[1],
                                              max_new_tokens=sample["max_new_tokens"])
                sink.write(json.dumps({"index": sample["index"], "task": sample["task"], "ratio": ratio,
                                       "answer": answer, "kept": kept,
                                       "seconds": round(time.perf_counter() - start + shared, 3)}) + "\n")
                sink.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
