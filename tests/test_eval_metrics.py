"""RULER's string-match metrics on hand-written cases."""

import pytest

from kvpress_like.eval.metrics import postprocess, score, string_match_all, string_match_part


def test_string_match_all_is_the_fraction_of_answers_found():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The numbers are 123 and 789.", ["123", "456"]) == 0.5
    assert string_match_all("none here", ["123", "456", "789"]) == 0.0
    assert string_match_all("VAR ABCDE, var fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5  # case-insensitive
    assert string_match_all("12345", ["1234"]) == 1.0  # a substring, as RULER matches


def test_string_match_part_is_one_if_any_answer_is_found():
    assert string_match_part("It is Paris.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It is Marseille.", ["Paris", "Lyon"]) == 0.0
    assert string_match_part("the WAAL river", ["Waal"]) == 1.0


def test_postprocess_removes_control_characters():
    assert postprocess("\n  12\n34\t ") == "12 34"
    assert string_match_all("12\n34", ["12 34"]) == 1.0  # a newline inside the prediction matches a space


def test_score_dispatches_and_rejects_unknown_metrics_and_empty_answers():
    assert score("string_match_all", "a b", ["a", "c"]) == 0.5
    assert score("string_match_part", "a b", ["a", "c"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'exact'.*string_match_all"):
        score("exact", "a", ["a"])
    with pytest.raises(ValueError, match="answers must not be empty"):
        string_match_all("a", [])
    with pytest.raises(ValueError, match="answers must not be empty"):
        string_match_part("a", [])
