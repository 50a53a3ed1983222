"""Compare the vLLM integration's answers with the transformers path's for the same press on the same prompts.

Reads the JSON written by ``press_in_vllm.py answers`` (prompt token ids, vLLM's greedy answers per press), runs
``with press(model, p): model.generate(ids)`` on the embedded SmolLM2-135M with the same token ids (the whole prompt is
compressed at prefill in both engines), and prints per press how many answers are token-for-token identical, where
the others first differ, and how many contain the expected needle in each engine. Run in the project environment:

    python benchmarks/vllm/transformers_answers.py vllm_answers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, ``None`` if one sequence is a prefix of the other and lengths match."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="JSON written by press_in_vllm.py answers")
    parser.add_argument("--out", help="write the comparison (JSON) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from kvpress_like import press, press_from_dict
    from kvpress_like.eval.model import load_default_model

    data = json.loads(Path(args.results).read_text(encoding="utf-8"))
    model, tokenizer = load_default_model()
    eos = tokenizer.eos_token_id
    table = {name: {"identical": 0, "n": 0, "vllm_hits": 0, "hf_hits": 0, "first_diffs": []}
             for name in data["presses"]}
    rows = []
    for sample in data["samples"]:
        ids = torch.tensor([sample["prompt_ids"]])
        for name, run in sample["runs"].items():
            spec = {"press": name, "ratio": data["ratio"]} if name != "none" else None
            with torch.no_grad():
                if spec is None:
                    out = model.generate(ids, max_new_tokens=data["new_tokens"], do_sample=False)
                else:
                    with press(model, press_from_dict(spec)):
                        out = model.generate(ids, max_new_tokens=data["new_tokens"], do_sample=False)
            hf = out[0, ids.shape[1]:].tolist()
            if eos in hf:
                hf = hf[: hf.index(eos) + 1]
            vl = run["token_ids"]
            diff = first_difference(hf, vl)
            cell = table[name]
            cell["n"] += 1
            cell["identical"] += diff is None
            hf_text = tokenizer.decode(hf, skip_special_tokens=True)
            cell["hf_hits"] += any(a in hf_text for a in sample["answers"])
            cell["vllm_hits"] += any(a in run["text"] for a in sample["answers"])
            if diff is not None:
                cell["first_diffs"].append(diff)
            rows.append({"index": sample["index"], "press": name, "identical": diff is None, "first_diff": diff,
                         "hf_text": hf_text, "vllm_text": run["text"]})
            print(f"sample {sample['index']} {name:9s} {'same' if diff is None else f'differs at token {diff}'}  "
                  f"hf {hf_text[:30]!r}  vllm {run['text'][:30]!r}", flush=True)
    print(f"\n{data['length']}-token prompts, ratio {data['ratio']}, greedy, {data['new_tokens']} new tokens")
    for name, cell in table.items():
        print(f"{name:9s} identical {cell['identical']}/{cell['n']}  needle found: vllm {cell['vllm_hits']}, "
              f"transformers {cell['hf_hits']}  first differences at {cell['first_diffs']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"table": table, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
