"""Side-by-side answer quality against NVIDIA kvpress on exactly the same prompts.

kvpress pins an older transformers, so it runs in its own virtual environment (``--setup`` creates one:
``torch==2.13.0`` first, then ``kvpress`` and ``gguf``). For every task and length the samples of
``kvpress_like.eval.tasks`` are tokenized once here and split as ``kvpress-like eval`` splits them (``--mode
query_agnostic``, the default: after the context, so the question is not seen by the press; ``--mode query_aware``:
the question joins the compressed part and only the prompt's last token follows); ``kvpress_worker.py`` answers those
very token ids with kvpress (the first part prefilled under the press, the rest decoded greedily by kvpress's own
pipeline), and ``kvpress-like eval``'s runner answers them with our presses. Both
sets of answers are scored by ``kvpress_like.eval.metrics`` and written to one ``results.jsonl`` (kvpress's rows are
labelled ``kvpress:<Press>``), so the summary pairs them sample by sample.

    python benchmarks/compare_kvpress.py --setup /tmp/kvpress-venv          # once (about 2 minutes)
    python benchmarks/compare_kvpress.py --kvpress-python /tmp/kvpress-venv/bin/python \\
        --tasks niah_single_2 niah_multikey_1 qa_1 --length 2048 --samples 50 --output compare_results

Prints per task, length and ratio each press's score with its 95 % interval and the paired difference of each of our
presses against kvpress's (mean over shared samples, bootstrap 95 % interval, and the samples only one side answers).
Interrupted runs resume: cells already in ``results.jsonl`` are skipped, on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("query_agnostic", "query_aware")  # kvpress_like.eval.runner.MODES (not imported before --setup)
DEFAULT_PRESSES = ["compactor", "compactor:allocator=head_adaptive"]


def setup_venv(path: Path) -> Path:
    """Create a virtual environment with kvpress at ``path``; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    for packages in (["torch==2.13.0"], ["kvpress", "gguf", "sentencepiece"]):  # torch first: the CPU build on disk
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", metavar="DIR", help="create a kvpress virtual environment in DIR and exit")
    parser.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"),
                        help="python of the kvpress environment (default: $KVPRESS_PYTHON)")
    parser.add_argument("--kvpress-press", default="CompactorPress", help="kvpress press class")
    parser.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES, help="our press specs (as for eval)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--tasks", nargs="+", default=["niah_single_2", "niah_multikey_1", "qa_1"])
    parser.add_argument("--length", nargs="+", type=int, default=[2048])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="compare_results")
    parser.add_argument("--max-new-tokens", type=int, help="decoding budget on both sides (default: each task's)")
    parser.add_argument("--mode", choices=MODES, default="query_agnostic", help="where the prompt is split")
    parser.add_argument("--skip-ours", action="store_true", help="only run kvpress's side")
    args = parser.parse_args(argv)
    if args.setup:
        print(setup_venv(Path(args.setup)))
        return 0
    if not args.kvpress_python:
        parser.error("give --kvpress-python (or set KVPRESS_PYTHON); create the environment with --setup DIR")

    import torch

    from kvpress_like.eval import DEFAULT_GGUF_FILE, default_model_dir, load_default_model
    from kvpress_like.eval.metrics import score
    from kvpress_like.eval.runner import (
        FULL,
        RESULTS_FILE,
        cell_key,
        format_table,
        load_results,
        paired_table,
        read_jsonl,
        run_eval,
        split_prompt,
        summarize,
    )
    from kvpress_like.eval.tasks import generate_samples

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = output / RESULTS_FILE
    label = f"kvpress:{args.kvpress_press}"
    model_name, mode = "default", args.mode
    model, tokenizer = load_default_model()
    for length in args.length:
        for task in args.tasks:
            samples = generate_samples(task, tokenizer, length, args.samples, seed=args.seed)
            done = load_results(results)
            todo = [(s, r) for s in samples for r in args.ratios
                    if cell_key(model_name, label, r, task, length, mode, s.index, args.seed) not in done]
            if not todo:
                continue
            stem = f"{args.kvpress_press}_{mode}_{task}_{length}"  # one per press and mode: never mixed up
            inputs = output / f"kvpress_samples_{stem}.jsonl"
            answers = output / f"kvpress_answers_{stem}.jsonl"  # appended to: survives an interruption
            answered = {(a["index"], a["ratio"]) for a in read_jsonl(answers)}
            todo = [(s, r) for s, r in todo if (s.index, r) not in answered]
            if todo:
                with inputs.open("w", encoding="utf-8") as sink:
                    for sample in {s.index: s for s, _ in todo}.values():
                        context_ids, suffix_ids = split_prompt(tokenizer, sample, mode)
                        sink.write(json.dumps({"index": sample.index, "task": task,
                                               "context_ids": context_ids[0].tolist(),
                                               "suffix_ids": suffix_ids[0].tolist(),
                                               "max_new_tokens": args.max_new_tokens or sample.max_new_tokens})
                                   + "\n")
                start = time.perf_counter()
                subprocess.run([args.kvpress_python, str(HERE / "kvpress_worker.py"), "--input", str(inputs),
                                "--output", str(answers), "--press", args.kvpress_press,
                                "--ratios", *map(str, sorted({r for _, r in todo})),
                                "--model-dir", str(default_model_dir()), "--gguf-file", DEFAULT_GGUF_FILE], check=True)
                print(f"kvpress: {task} {length}: {len(todo)} cells in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
            by_index = {s.index: s for s in samples}
            with results.open("a", encoding="utf-8") as sink:
                for answer in read_jsonl(answers):
                    sample = by_index.get(answer["index"])
                    key = cell_key(model_name, label, answer["ratio"], task, length, mode, answer["index"], args.seed)
                    if sample is None or answer["ratio"] not in args.ratios or key in done:
                        continue
                    prediction = answer["answer"].strip()
                    sink.write(json.dumps({
                        "key": key, "model": model_name, "press": label, "ratio": answer["ratio"], "task": task,
                        "length": length, "mode": mode, "index": sample.index, "seed": args.seed,
                        "score": score(sample.metric, prediction, sample.answers), "prediction": prediction,
                        "answers": list(sample.answers), "kept_fraction": answer["kept"],
                        "seconds": answer["seconds"]}) + "\n")
    if not args.skip_ours:
        with torch.no_grad():
            run_eval(model, tokenizer, presses=args.presses, ratios=args.ratios, tasks=args.tasks,
                     lengths=args.length, samples=args.samples, output_dir=output, seed=args.seed,
                     model_name=model_name, max_new_tokens=args.max_new_tokens, mode=mode)
    records = [r for r in load_results(results).values()
               if r["seed"] == args.seed and r["task"] in args.tasks and r["length"] in args.length
               and r["index"] < args.samples and r["mode"] == mode and (r["press"] in (FULL, label, *args.presses))]
    print(format_table(summarize(records)))
    print()
    print(paired_table(records, reference=label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
