"""NVIDIA RULER's scoring of its synthetic tasks: case-insensitive substring match of the expected answers.

As in RULER (``eval/synthetic/constants.py`` and ``eval/evaluate.py`` of the ``nvidia-long-context-eval`` wheel):

* a prediction is first post-processed by :func:`postprocess` (strip, control characters turned into newlines,
  strip again);
* ``string_match_all`` (niah, vt, cwe, fwe): the fraction of the expected answers that occur in the prediction;
* ``string_match_part`` (qa): 1 if any expected answer occurs in the prediction, else 0.

Departures from RULER: scores are per sample and in [0, 1] (RULER reports percentages averaged over samples);
``None`` as the prediction scores like an empty string, as RULER's post-processing makes it; empty ``answers`` raise a
``ValueError`` (RULER divides by zero); a single string as ``answers`` is one answer, not a sequence of characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str | None) -> str:
    """RULER's post-processing of a prediction: strip, replace control characters by newlines, strip again.

    Args:
        prediction: the generated text (``None`` gives ``""``).

    Returns:
        The cleaned prediction.
    """
    if prediction is None:
        return ""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _answers(answers: str | Iterable[str]) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("answers must not be empty: give at least one expected answer")
    if not all(isinstance(a, str) for a in answers):
        raise TypeError(f"answers must be strings; got {answers!r}")
    return answers


def string_match_all(prediction: str | None, answers: str | Iterable[str]) -> float:
    """Fraction of ``answers`` found in ``prediction``, case-insensitively (RULER's niah, vt, cwe and fwe metric).

    Args:
        prediction: the generated text (post-processed with :func:`postprocess`).
        answers: the expected answers (a single string is one answer).

    Returns:
        ``(number of answers that are substrings of the prediction) / len(answers)``, in [0, 1].

    Raises:
        ValueError: ``answers`` is empty.
    """
    answers = _answers(answers)
    text = postprocess(prediction).lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str | None, answers: str | Iterable[str]) -> float:
    """1.0 if any of ``answers`` is found in ``prediction``, case-insensitively, else 0.0 (RULER's qa metric).

    Args:
        prediction: the generated text (post-processed with :func:`postprocess`).
        answers: the accepted answers (a single string is one answer).

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: ``answers`` is empty.
    """
    answers = _answers(answers)
    text = postprocess(prediction).lower()
    return float(any(answer.lower() in text for answer in answers))


METRICS: dict[str, Callable[[str | None, str | Iterable[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def score(metric: str, prediction: str | None, answers: str | Iterable[str]) -> float:
    """Score a prediction with the metric named ``metric`` (see :data:`METRICS`).

    Args:
        metric: ``"string_match_all"`` or ``"string_match_part"`` (a task sample's ``metric``).
        prediction: the generated text.
        answers: the expected answers.

    Returns:
        The score in [0, 1].

    Raises:
        ValueError: an unknown metric (the message lists the known ones) or empty ``answers``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")
    return METRICS[metric](prediction, answers)
