"""The ``kvpress-like`` command line.

Subcommands:

* ``presses``: every registered press (name, class, one-line description), allocator and architecture;
* ``plugins``: every loaded plugin, its version and the hooks it implements;
* ``eval``: evaluate presses × ratios on RULER-style tasks (resumable), print a table and save a plot;
* ``run``: load a model (the embedded SmolLM2-135M-Instruct by default), compress the KV cache of a long context
  with a press, ask a question about it and report the answer, the cache size before and after, and the times.

``run`` compresses the context only (query-agnostic): the chat-templated prompt is split right after the context,
the context part is prefilled in one forward inside ``with press(model, p)`` (that first forward of the cache is
compressed), then the question and the assistant prefix are fed and the answer is greedily decoded on the
compressed cache (later forwards are never compressed). Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_FILE_QUESTION = "What is the text above about? Answer in one sentence."


# -- small helpers ---------------------------------------------------------------------------------------------------
def _first_line(obj) -> str:
    """The first paragraph of a docstring on one line (summaries may wrap over several lines)."""
    doc = (inspect.getdoc(obj) or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _stage(message: str) -> None:
    print(f"kvpress-like: {message}", file=sys.stderr, flush=True)


def _mib(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


class CLIError(ValueError):
    """A user error: printed as ``kvpress-like: error: ...`` with exit status 2."""


def _ratio_note(p, result: RunResult) -> str:
    """``ratio 0.5``; for a calibrated press the ratio it chose and why (recorded on the cache of the run:
    ``result.compression_info``); for a decoding press the prefill ratio of its scorer and the decoding budget."""
    chosen = result.compression_info
    if chosen is not None and "retention" in chosen:
        return (f"ratio {chosen['ratio']:.3f} chosen for quality {chosen['quality']:g}: context NLL "
                f"{chosen['context_nll']:.3f}, retention {chosen['retention']:.3f}")
    note = f"ratio {result.ratio:g}"
    if hasattr(p, "target") and hasattr(p, "interval"):  # DecodingPress
        note += f" at prefill, then {p.target}-{p.target + p.interval - 1} entries per head while decoding"
    return note


def _ratio_arg(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in [0, 1) or 'auto'; got {text!r}") from None


def parse_press_args(items: list[str] | None) -> dict:
    """``["window=32", "allocator=uniform"]`` -> ``{"window": 32, "allocator": "uniform"}``
    (:func:`kvpress_like.registry.parse_press_params`, with the errors of ``--press-arg``)."""
    from .registry import parse_press_params

    if any(item.partition("=")[0].strip() in ("ratio", "compression_ratio") for item in items or []):
        raise CLIError("set the ratio with --ratio, not --press-arg")
    try:
        return parse_press_params(items)
    except ValueError as error:
        raise CLIError(f"--press-arg {error}") from error


# -- presses / plugins -----------------------------------------------------------------------------------------------
def cmd_presses(args) -> int:
    from . import registry
    from .context import SUPPORTED_ATTENTION

    presses = {name: registry.get_press_class(name) for name in registry.list_presses()}
    # Classes, not instances: some allocators need constructor arguments (e.g. per_layer's ratios).
    allocator_classes = {name: registry.get_allocator_class(name) for name in registry.list_allocators()}
    allocators = {name: allocator_classes[name] for name in registry.list_allocators()}
    architectures = registry.list_architectures()
    if args.json:
        data = {
            "presses": [{"name": n, "class": _qualified(c), "doc": _first_line(c)} for n, c in presses.items()],
            "allocators": [{"name": n, "class": _qualified(c), "doc": _first_line(c)} for n, c in allocators.items()],
            "architectures": [{"name": n, "model_types": list(t)} for n, t in architectures.items()],
            "attention_implementations": list(SUPPORTED_ATTENTION),
        }
        print(json.dumps(data, indent=2))
        return 0

    def table(rows):
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] if rows else []
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            print("  " + "  ".join(cells + [row[-1]]).rstrip())

    print("Presses (kvpress_like.create_press(name, ratio=...), kvpress-like run --press NAME):")
    table([(n, _qualified(c), _first_line(c)) for n, c in presses.items()])
    print()
    print("Allocators (Press(..., allocator=NAME)):")
    table([(n, _qualified(c), _first_line(c)) for n, c in allocators.items()])
    print()
    print("Architectures (config.model_type):")
    table([(n, ", ".join(t)) for n, t in architectures.items()])
    print()
    print(f"Attention implementations: {', '.join(SUPPORTED_ATTENTION)}")
    return 0


def cmd_plugins(args) -> int:
    from . import registry

    plugins = registry.list_plugins()
    if args.json:
        print(json.dumps(plugins, indent=2))
        return 0
    name_width = max([len("name")] + [len(p["name"]) for p in plugins])
    version_width = max([len("version")] + [len(p["version"] or "-") for p in plugins])
    print(f"{'name'.ljust(name_width)}  {'version'.ljust(version_width)}  hooks")
    for p in plugins:
        hooks = ", ".join(p["hooks"]) or "-"
        print(f"{p['name'].ljust(name_width)}  {(p['version'] or '-').ljust(version_width)}  {hooks}")
    if os.environ.get(registry.DISABLE_ENV, "") not in ("", "0"):
        print(f"(third-party plugins are disabled: {registry.DISABLE_ENV} is set)")
    return 0


# -- run -------------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What ``kvpress-like run`` measured (``--json`` prints it)."""

    press: str
    context_tokens: int
    question_tokens: int
    answer: str
    generated_tokens: int
    bytes_before: int
    bytes_after: int
    kept_fraction: float
    compressed_layers: int
    prefill_seconds: float
    decode_seconds: float
    load_seconds: float = 0.0
    ratio: float | None = None
    expected: str | None = None
    found: bool | None = None
    compression_info: dict | None = None  # what the press chose for this context (kvpress_like.compression_info)


def encode_prompt(tokenizer, context: str, question: str):
    """``(context_ids, suffix_ids)``, each ``[1, n]``: see :func:`kvpress_like.pipeline.encode_prompt`."""
    from .pipeline import encode_prompt as encode

    try:
        return encode(tokenizer, context, question)
    except ValueError as error:
        raise CLIError(str(error)) from error


@contextmanager
def _layer_progress(model, desc: str, enabled: bool = True):
    """A tqdm bar ticking once per decoder layer of one forward (stderr, only on a terminal)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is part of the [eval] extra; stage messages still show progress
        yield
        return
    from .registry import architecture_for

    layers = architecture_for(model.config).decoder_layers(model)
    bar = tqdm(total=len(layers), desc=desc, unit="layer", file=sys.stderr, disable=None if enabled else True,
               leave=False)
    handles = [layer.register_forward_hook(lambda *_: bar.update(1)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def run_job(model, tokenizer, p, context: str, question: str, max_new_tokens: int = 32, progress: bool = True,
            chunk_size: int | None = None):
    """Prefill-compress ``context`` with press ``p``, then answer ``question`` greedily on the compressed cache.

    Args:
        model: a supported causal LM in eval mode.
        tokenizer: its tokenizer.
        p: the press.
        context: the long text to compress.
        question: asked after the context (never compressed).
        max_new_tokens: decoding budget.
        progress: show a per-layer progress bar while prefilling (on a terminal).
        chunk_size: prefill in chunks of this many tokens, compressing after each
            (:func:`kvpress_like.chunked.chunked_prefill`); ``None``: one forward.

    Returns:
        A :class:`RunResult` (``load_seconds``, ``expected`` and ``found`` are left for the caller).
    """
    import torch

    from .cache import CACHE_KWARG, cache_bytes, full_cache_bytes, kept_fraction, prefill
    from .chunked import chunked_prefill
    from .context import press
    from .press import applied_ratio, compression_info, describe

    context_ids, suffix_ids = encode_prompt(tokenizer, context, question)
    device = next(model.parameters()).device
    context_ids, suffix_ids = context_ids.to(device), suffix_ids.to(device)
    n_context = context_ids.shape[1]
    dtype = next(model.parameters()).dtype
    eos = _eos_ids(model, tokenizer)
    forward_kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # only the next-token logits are needed

    generated: list[int] = []
    with press(model, p) if chunk_size is None else nullcontext(), torch.no_grad():
        chunks = "" if chunk_size is None else f" in chunks of {chunk_size}"
        _stage(f"prefill+compress: {n_context:,} context tokens{chunks} with {describe(p)} ...")
        start = time.perf_counter()
        with _layer_progress(model, "prefill+compress", enabled=progress and chunk_size is None):
            if chunk_size is None:
                cache = prefill(model, context_ids, **forward_kwargs)
            else:
                cache = chunked_prefill(model, p, context_ids, chunk_size)
        prefill_seconds = time.perf_counter() - start
        bytes_after = cache_bytes(cache)
        kept = kept_fraction(cache)
        compressed_layers = sum(hasattr(layer, "kept_entries") for layer in cache.layers)

        _stage(f"decode: question ({suffix_ids.shape[1]} tokens) and up to {max_new_tokens} new tokens ...")
        start = time.perf_counter()
        logits = model(input_ids=suffix_ids, **{CACHE_KWARG: cache}, use_cache=True, **forward_kwargs).logits[:, -1]
        for step in range(max_new_tokens):
            token = int(logits.argmax(-1)[0])
            if token in eos:
                break
            generated.append(token)
            if step + 1 < max_new_tokens:
                next_ids = torch.tensor([[token]], device=device)
                logits = model(input_ids=next_ids, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1]
        decode_seconds = time.perf_counter() - start

    answer = tokenizer.decode(generated, skip_special_tokens=True).strip()
    return RunResult(
        press=describe(p, cache) + ("" if chunk_size is None else f", chunked prefill ({chunk_size} tokens a chunk)"),
        context_tokens=n_context,
        question_tokens=suffix_ids.shape[1],
        answer=answer,
        generated_tokens=len(generated),
        bytes_before=full_cache_bytes(model.config, n_context, batch_size=1, dtype=dtype),
        bytes_after=bytes_after,
        kept_fraction=kept,
        compressed_layers=compressed_layers,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        ratio=applied_ratio(p, cache),
        compression_info=compression_info(cache, p),
    )


_DTYPES = ("float32", "bfloat16", "float16", "auto")


# The built-in sample needs room for its needle (about 15 tokens) and 16 tokens of haystack; checked before the model
# (and its tokenizer) is loaded, so it is a little stricter than what any tokenizer needs.
MIN_SAMPLE_LENGTH = 64


def _check_model_arg(model: str) -> None:
    """``--model`` is ``default`` or a directory holding a transformers model (checked without importing them)."""
    if model == "default":
        return
    directory = Path(model).expanduser()
    if not directory.exists():
        raise CLIError(f"--model {model}: no such directory (pass 'default' for the embedded SmolLM2-135M-Instruct, "
                       "or a directory saved with save_pretrained; nothing is downloaded)")
    if not directory.is_dir():
        raise CLIError(f"--model {model}: not a directory (a model is a directory saved with save_pretrained)")
    if not (directory / "config.json").is_file():
        raise CLIError(f"--model {model}: not a model directory (no config.json; a model is a directory saved with "
                       "save_pretrained, holding config.json, the weights and the tokenizer)")


def _load_model(args):
    """``(model, tokenizer, label, seconds)`` for ``--model``/``--dtype``; a directory that transformers cannot load
    as a causal LM with its tokenizer is a :class:`CLIError`."""
    import torch

    from .eval import model as eval_model

    label = eval_model.DEFAULT_MODEL_NAME if args.model == "default" else args.model
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    _stage(f"loading model {label} ...")
    start = time.perf_counter()
    try:
        model, tokenizer = eval_model.load_model(args.model, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:  # what from_pretrained raises for a directory it cannot load
        if args.model == "default":
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"--model {args.model}: cannot load a causal LM and its tokenizer from it: {first}") from error
    seconds = time.perf_counter() - start
    _stage(f"model loaded in {seconds:.1f} s")
    return model, tokenizer, label, seconds


def _read_context_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CLIError(f"cannot read --context-file: {error}") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CLIError(f"--context-file {path} is not UTF-8 text (invalid byte 0x{data[error.start]:02x} at offset "
                       f"{error.start}); convert it to UTF-8") from None
    if not text.strip():
        raise CLIError(f"--context-file {path} is empty")
    return text


def _check_run_args(args) -> str | None:
    """Every check of ``run``'s arguments that needs neither torch nor the model; returns the context file's text."""
    for name in ("max_new_tokens", "chunk_size", "length", "decode_budget", "decode_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.ratio != "auto" and not 0.0 <= args.ratio < 1.0:
        raise CLIError(f"--ratio must be in [0, 1) (0 keeps everything, 0.6 keeps 40 %) or 'auto'; got {args.ratio:g}")
    if args.ratio != "auto" and (args.quality is not None or args.calibration is not None):
        raise CLIError("--quality and --calibration go with --ratio auto")
    if args.quality is not None and not 0.0 < args.quality <= 1.0:
        raise CLIError(f"--quality must be a number in (0, 1]; got {args.quality:g}")
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise CLIError(f"--calibration {args.calibration}: no such file")
    if not 0.0 <= args.depth <= 1.0:
        raise CLIError(f"--depth must be in [0, 1] (0 = start of the context, 1 = end); got {args.depth:g}")
    if args.context_file is None and args.length is not None and args.length < MIN_SAMPLE_LENGTH:
        raise CLIError(f"--length must be >= {MIN_SAMPLE_LENGTH} tokens for the built-in sample (room for the needle); "
                       f"got {args.length}")
    if args.allocator is not None and any(item.partition("=")[0].strip() == "allocator"
                                          for item in args.press_arg or []):
        raise CLIError("give the allocator once: --allocator or --press-arg allocator=...")
    _check_model_arg(args.model)
    return _read_context_file(args.context_file) if args.context_file is not None else None


DEFAULT_LENGTH = 1024  # --length of the built-in sample


def fit_to_length(tokenizer, make_context, question: str, length: int) -> str:
    """The context ``make_context(n)`` whose prefilled part, the chat template's header plus the context (what ``run``
    compresses, :func:`kvpress_like.pipeline.encode_prompt`'s ``context_ids``), is ``length`` tokens long.

    ``n`` starts at ``length`` and is corrected by the difference a few times (the header's length, and tokens merging
    at the seams); the longest context not over ``length`` is returned (shorter when the text itself is).

    Raises:
        CLIError: even the shortest attempt does not fit in ``length`` tokens (the header alone is too long).
    """
    from .pipeline import encode_prompt

    n, best, got = length, None, None
    for _ in range(4):
        if n < 1:
            break
        context = make_context(n)
        got = encode_prompt(tokenizer, context, question)[0].shape[1]
        if got <= length and (best is None or got > best[1]):
            best = (context, got)
        if got == length:
            break
        n += length - got
    if best is None:
        raise CLIError(f"--length {length} is too short: the chat template's header and a context take {got} tokens")
    return best[0]


def cmd_run(args) -> int:
    file_text = _check_run_args(args)  # before importing torch and loading the model
    press_args = parse_press_args(args.press_arg)
    if args.allocator is not None:
        press_args["allocator"] = args.allocator

    from .calibration import load_calibration
    from .chunked import check_press
    from .decoding import DecodingPress
    from .eval import sample as eval_sample
    from .registry import architecture_for, create_press

    if args.ratio == "auto":
        press_args["quality"] = 0.95 if args.quality is None else args.quality
        if args.calibration is not None:
            try:
                load_calibration(args.calibration)
            except ValueError as error:
                raise CLIError(f"--calibration: {error}") from error
            press_args["params"] = args.calibration
    try:
        p = create_press(args.press, ratio=args.ratio, **press_args)
        if args.decode_budget is not None:
            p = DecodingPress(scorer=p, target=args.decode_budget, interval=args.decode_interval,
                              compress_prefill=True)
    except (TypeError, ValueError) as error:
        raise CLIError(f"cannot create press {args.press!r}: {error}") from error
    if args.chunk_size is not None:
        try:
            check_press(p)
        except (TypeError, ValueError) as error:
            raise CLIError(f"--chunk-size: {error}") from error
    if args.context_file is None:
        eval_sample.data_dir()  # fail early, before the slow model load, if the haystack is not installed

    model, tokenizer, label, load_seconds = _load_model(args)
    try:
        architecture_for(model.config)
    except ValueError as error:
        raise CLIError(str(error)) from error

    expected = None
    if args.context_file is not None:
        question = args.question or DEFAULT_FILE_QUESTION
        context = file_text
        if args.length is not None:
            context = fit_to_length(tokenizer, lambda n: eval_sample.truncate_to_tokens(tokenizer, file_text, n),
                                    question, args.length)
        source = f"file {args.context_file}"
    else:
        question = args.question or eval_sample.QUESTION
        samples = {}

        def make_sample(n: int) -> str:
            try:
                samples[n] = eval_sample.build_sample(tokenizer, length=n, depth=args.depth)
            except ValueError as error:
                raise CLIError(f"--length {args.length or DEFAULT_LENGTH}: {error}") from error
            return samples[n].context

        context = fit_to_length(tokenizer, make_sample, question, args.length or DEFAULT_LENGTH)
        sample = next(s for s in samples.values() if s.context == context)
        expected = sample.answer if args.question is None else None
        source = f"built-in sample (Paul Graham essays, needle at depth {args.depth:g})"

    try:
        result = run_job(model, tokenizer, p, context, question, max_new_tokens=args.max_new_tokens,
                         progress=not args.no_progress, chunk_size=args.chunk_size)
    except ValueError as error:  # e.g. a press chunked prefill or calibration does not support
        raise CLIError(str(error)) from error
    result.load_seconds = load_seconds
    if expected is not None:
        result.expected = expected
        result.found = expected in result.answer

    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    bytes_ratio = result.bytes_after / result.bytes_before if result.bytes_before else 1.0
    print(f"model:           {label}")
    print(f"press:           {result.press}")
    print(f"context:         {result.context_tokens:,} tokens, {source}")
    print(f"question:        {question}")
    print("answer:          " + result.answer.replace("\n", "\n                 "))
    if result.expected is not None:
        print(f"expected:        {result.expected} ({'found' if result.found else 'NOT found'} in the answer)")
    print(f"KV cache before: {_mib(result.bytes_before)}  (full cache of the context)")
    print(f"KV cache after:  {_mib(result.bytes_after)}  (compressed, kvpress_like.cache_bytes)")
    print(f"kept fraction:   {bytes_ratio:.3f} of the bytes; {result.kept_fraction:.3f} of the KV pairs in the "
          f"{result.compressed_layers} compressed layers ({_ratio_note(p, result)})")
    print(f"time:            load {result.load_seconds:.1f} s, prefill+compress {result.prefill_seconds:.2f} s, "
          f"decode {result.decode_seconds:.2f} s ({result.generated_tokens} tokens)")
    return 0


def cmd_eval(args) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")

    from .eval import runner
    from .eval import sample as eval_sample

    grid = {"presses": args.presses, "ratios": args.ratios, "tasks": args.tasks, "lengths": args.length,
            "samples": args.samples}
    try:
        runner.check_grid(**grid, mode=args.mode)  # fail before the slow model load
    except ValueError as error:
        raise CLIError(str(error)) from error
    _check_model_arg(args.model)
    eval_sample.data_dir()
    output = Path(args.output or Path("eval_results") / ("default" if args.model == "default" else
                                                          Path(args.model).name))
    model, tokenizer, label, _ = _load_model(args)
    records = runner.run_eval(model, tokenizer, **grid, output_dir=output, mode=args.mode, seed=args.seed,
                              model_name=args.model, max_new_tokens=args.max_new_tokens,
                              progress=not args.no_progress)
    table = runner.format_table(runner.summarize(records))
    first = runner.PressSpec.parse(args.presses[0]).label
    for reference in dict.fromkeys([runner.FULL] + ([first] if len(args.presses) > 1 else [])):
        table += f"\n\nPaired difference against {reference} on the same samples:\n\n"
        table += runner.paired_table(records, reference)
    (output / "summary.md").write_text(table + "\n", encoding="utf-8")
    plot_path = runner.plot(runner.summarize(records, by_task=False), output / runner.PLOT_FILE)
    print(f"model: {label}; mode: {args.mode}; tasks: {' '.join(args.tasks)}; {args.samples} sample(s) per task")
    print(table)
    print(f"results: {output / runner.RESULTS_FILE}\nsummary: {output / 'summary.md'}\nplot:    {plot_path}")
    return 0


def cmd_calibrate(args) -> int:
    if args.samples < 1 or any(n < 64 for n in args.lengths):
        raise CLIError("--samples must be >= 1 and --lengths >= 64 tokens")
    _check_model_arg(args.model)

    import shlex

    from . import calibration
    from .eval.calibration import calibrate
    from .registry import list_presses

    unknown = [name for name in args.press if name not in list_presses()]
    if unknown:
        raise CLIError(f"unknown press(es) {unknown}; see kvpress-like presses")
    model, tokenizer, label, _ = _load_model(args)
    command = ["calibrate", "--press", *args.press, "--lengths", *map(str, args.lengths), "--samples",
               str(args.samples), "--seed", str(args.seed), *(["--tasks", *args.tasks] if args.tasks else []),
               *(["--model", args.model] if args.model != "default" else []), "--output", args.output]
    command = " ".join(["kvpress-like", *(shlex.quote(a) for a in command)])  # recorded in the file
    try:
        result = calibrate(model, tokenizer, args.press, lengths=args.lengths, samples=args.samples, seed=args.seed,
                           model_name=label, command=command, tasks=args.tasks, progress=not args.no_progress)
    except ValueError as error:
        raise CLIError(str(error)) from error
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    calibration.save_calibration(result, output)
    print(f"model: {label}")
    print("| press | alpha | beta | points | mean context NLL | retention at quality 0.95 (mean NLL) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, entry in result["presses"].items():
        nll = sum(p["context_nll"] for p in entry["points"]) / len(entry["points"])
        retention = calibration.QualityModel(entry["alpha"], entry["beta"]).retention(0.95, nll)
        print(f"| {name} | {entry['alpha']:.4f} | {entry['beta']:.4f} | {len(entry['points'])} | {nll:.3f} "
              f"| {retention:.3f} |")
    print(f"saved: {output}")
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpress-like",
        description="KV-cache compression (presses) for Hugging Face transformers causal LMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    presses = sub.add_parser("presses", help="list the registered presses, allocators and architectures")
    presses.add_argument("--json", action="store_true", help="print JSON")
    presses.set_defaults(func=cmd_presses)

    plugins = sub.add_parser("plugins", help="list the loaded plugins, their versions and hooks")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.set_defaults(func=cmd_plugins)

    run = sub.add_parser(
        "run",
        help="compress a long context with a press and answer a question about it",
        description="Load a model, prefill-compress a long context with a press (query-agnostic: only the context "
        "is compressed), then answer a question on the compressed cache. Reports the answer, the KV-cache bytes "
        "before and after compression and the times. Without --context-file, a built-in needle-in-a-haystack "
        "sample is used.",
    )
    run.add_argument("--press", default="compactor",
                     help="registered press name (kvpress-like presses; default: compactor, query-agnostic)")
    run.add_argument("--ratio", type=_ratio_arg, default=0.5,
                     help="fraction of the context's KV pairs removed, in [0, 1), or 'auto': chosen per context to "
                     "keep --quality of the full cache's quality (context-calibrated; default: 0.5)")
    run.add_argument("--quality", type=float, default=None,
                     help="with --ratio auto: fraction of full-cache quality to keep, in (0, 1] (default: 0.95)")
    run.add_argument("--calibration", metavar="FILE",
                     help="with --ratio auto: parameters from kvpress-like calibrate (default: the shipped ones)")
    run.add_argument("--allocator", metavar="NAME",
                     help="budget allocator (kvpress-like presses lists them; default: the press's own, uniform)")
    run.add_argument("--press-arg", action="append", metavar="KEY=VALUE",
                     help="extra press parameter, repeatable (e.g. --press-arg window=32 "
                     "--press-arg allocator=uniform)")
    run.add_argument("--context-file", metavar="FILE", help="UTF-8 text file to use as the context")
    run.add_argument("--length", type=int, default=None,
                     help="tokens prefilled and compressed: the chat template's header before the context plus the "
                     "context (the built-in sample is built, or --context-file cut, to fit; default 1024 for the "
                     "sample, the whole file otherwise); the question is not counted")
    run.add_argument("--depth", type=float, default=0.5, help="needle depth of the built-in sample in [0, 1]")
    run.add_argument("--question", help="question asked after the context (default: the sample's question)")
    run.add_argument("--max-new-tokens", type=int, default=32, help="decoding budget (default: 32)")
    _add_model_args(run, "no progress bar (stage messages still go to stderr)")
    run.add_argument("--json", action="store_true", help="print the measurements as JSON")
    run.add_argument("--decode-budget", type=int, metavar="N",
                     help="also compress while decoding: keep N entries per head, compressing every --decode-interval")
    run.add_argument("--decode-interval", type=int, default=16, metavar="K",
                     help="growth allowed between decoding-time compressions (default: 16)")
    run.add_argument("--chunk-size", type=int, metavar="N",
                     help="prefill in chunks of N tokens, compressing after each (peak KV about budget + N)")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser(
        "eval",
        help="evaluate presses x ratios on RULER-style long-context tasks; table and plot",
        description="Evaluate every press at every ratio (and the full cache) on generated RULER-style tasks. "
        "Results are appended to OUTPUT/results.jsonl as they come; cells already there are skipped (resume by "
        "running the same command again). Prints a summary table, writes OUTPUT/summary.md and a PNG plot of "
        "score versus kept fraction.",
    )
    ev.add_argument("--presses", nargs="+", default=["compactor", "snapkv"], metavar="PRESS",
                    help="press names, optionally with parameters: name:key=value,key=value "
                    "(default: compactor snapkv)")
    ev.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75], metavar="R",
                    help="compression ratios in [0, 1) (default: 0.25 0.5 0.75)")
    ev.add_argument("--tasks", nargs="+", default=["niah_single_2"], metavar="TASK",
                    help="RULER-style task names, or 'fidelity' (default: niah_single_2)")
    ev.add_argument("--length", nargs="+", type=int, default=[2048], metavar="N",
                    help="prompt lengths in tokens of the model's tokenizer (default: 2048)")
    ev.add_argument("--samples", type=int, default=20, help="samples per task and length (default: 20)")
    ev.add_argument("--mode", choices=("query_agnostic", "query_aware"), default="query_agnostic",
                    help="compress the context only (default) or the context with the question")
    ev.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default: 0)")
    ev.add_argument("--output", metavar="DIR", help="results directory (default: eval_results/MODEL)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="decoding budget (default: each task's)")
    _add_model_args(ev)
    ev.set_defaults(func=cmd_eval)

    cal = sub.add_parser(
        "calibrate",
        help="fit the context-calibrated compression parameters of presses on generated calibration tasks",
        description="Measure each press's quality (answer NLL ratio, compressed vs full cache) at retentions "
        "0.1..0.9 on generated calibration samples (seeds disjoint from evaluation), fit the quality model "
        "b = alpha * NLL(context) + beta, and save the parameters as JSON for CalibratedPress(params=FILE).",
    )
    cal.add_argument("--press", nargs="+", default=["compactor"], help="press names (default: compactor)")
    cal.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048], help="context lengths in tokens")
    cal.add_argument("--samples", type=int, default=3, help="samples per task and length (default: 3)")
    cal.add_argument("--tasks", nargs="+", default=None, help="calibration task types (default: the seven of "
                     "kvpress_like.eval.calibration.CALIBRATION_TASKS)")
    cal.add_argument("--seed", type=int, default=1_000_003, help="seed of the calibration samples")
    cal.add_argument("--output", default="calibration.json", help="output JSON file (default: calibration.json)")
    _add_model_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    return parser


def _add_model_args(command, progress_help: str = "no progress bar") -> None:
    """``--model``, ``--dtype`` and ``--no-progress``, shared by the commands that load a model."""
    command.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct) or a local "
                         "model directory (default: default)")
    command.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (default: float32)")
    command.add_argument("--no-progress", action="store_true", help=progress_help)


def main(argv: list[str] | None = None) -> int:
    """Run the ``kvpress-like`` command line; returns the exit status."""
    from .registry import PluginError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("kvpress-like: interrupted", file=sys.stderr)
        return 130
    except CLIError as error:
        print(f"kvpress-like: error: {error}", file=sys.stderr)
        return 2
    except PluginError as error:  # names the plugin and how to disable plugins
        print(f"kvpress-like: error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from .eval.model import ModelNotAvailableError
        from .eval.sample import DataNotAvailableError

        if isinstance(error, (ModelNotAvailableError, DataNotAvailableError)):
            print(f"kvpress-like: error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
