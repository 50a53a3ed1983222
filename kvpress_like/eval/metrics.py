"""Scoring as NVIDIA RULER scores its synthetic tasks: case-insensitive substring match of the expected answers.

* ``string_match_all`` (niah, variable tracking, common and frequent words): the fraction of expected answers found
  in the prediction.
* ``string_match_part`` (qa): 1 if any expected answer is found.

RULER strips non-printable characters from predictions before matching; so does :func:`postprocess`.
"""

from __future__ import annotations

import re

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """The prediction with control characters (newlines included) replaced by spaces, stripped."""
    return _NON_PRINTABLE.sub(" ", prediction).strip()


def string_match_all(prediction: str, answers) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (case-insensitive), in [0, 1]."""
    text = postprocess(prediction).lower()
    answers = list(answers)
    if not answers:
        raise ValueError("answers must not be empty")
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers) -> float:
    """1.0 if any of ``answers`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    text = postprocess(prediction).lower()
    answers = list(answers)
    if not answers:
        raise ValueError("answers must not be empty")
    return float(any(answer.lower() in text for answer in answers))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(metric: str, prediction: str, answers) -> float:
    """Score ``prediction`` against ``answers`` with the metric named ``metric``.

    Raises:
        ValueError: an unknown metric (the message lists the known ones) or no answers.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prediction, answers)
