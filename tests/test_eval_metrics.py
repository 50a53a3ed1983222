"""RULER's string-match metrics and post-processing on hand-written cases, and against RULER's own functions."""

import pytest

from kvpress_like.eval.metrics import METRICS, postprocess, score, string_match_all, string_match_part


def test_string_match_all_is_the_fraction_of_answers_found():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("The numbers are 1234567 and 1111111.", ["1234567", "7654321"]) == 0.5
    assert string_match_all("I do not know.", ["1234567", "7654321", "2222222"]) == 0.0
    assert string_match_all("1. poet 2. Enter 3. PLOT", ["poet", "enter", "plot", "sky"]) == 0.75  # case-insensitive
    assert string_match_all("VAR ABCDE, var fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert string_match_all("12345678", ["1234567"]) == 1.0  # substring match, as RULER: no word boundaries
    assert string_match_all("7654321 1234567", ["1234567", "7654321"]) == 1.0  # order does not matter
    assert string_match_all("abc", ["abc", "abc", "xyz"]) == pytest.approx(2 / 3)  # every listed answer counts


def test_string_match_part_is_one_if_any_answer_is_found():
    assert string_match_part("It is in Normandy, France.", ["france", "the French state"]) == 1.0
    assert string_match_part("It is in Germany.", ["France", "the French state"]) == 0.0
    assert string_match_part("the WAAL river", ["Waal"]) == 1.0
    assert string_match_part("the Waal", ["Waal", "Rhine", "Meuse"]) == 1.0  # not a fraction
    assert string_match_part("", ["yes"]) == 0.0


def test_postprocess_is_rulers_strip_and_control_characters_to_newlines():
    assert postprocess("  \n 1234567\t7654321 \x07\n") == "1234567\n7654321"
    assert postprocess(None) == ""
    # RULER turns control characters into newlines, not spaces: a tab-separated answer matches a newline, not a space
    assert string_match_all("12\t34", ["12\n34"]) == 1.0
    assert string_match_all("12\t34", ["12 34"]) == 0.0
    assert string_match_all(None, ["a"]) == 0.0 and string_match_part(None, ["a"]) == 0.0


def test_a_single_string_is_one_answer_and_empty_answers_are_an_error():
    assert string_match_all("a b c", "abc") == 0.0  # not the characters 'a', 'b', 'c'
    assert string_match_part("the abc", "abc") == 1.0
    for metric in (string_match_all, string_match_part):
        with pytest.raises(ValueError, match="answers must not be empty"):
            metric("a", [])


def test_score_dispatches_by_name_and_rejects_unknown_metrics():
    assert set(METRICS) == {"string_match_all", "string_match_part"}
    assert score("string_match_all", "Paris and Rome", ["paris", "Lyon"]) == 0.5
    assert score("string_match_part", "Paris and Rome", ["paris", "Lyon"]) == 1.0
    with pytest.raises(ValueError, match=r"unknown metric 'exact_match'; known metrics: string_match_all, "
                                         r"string_match_part"):
        score("exact_match", "a", ["a"])


CASES = [
    ("The special magic numbers are 1234567, 7654321.", ["1234567", "7654321", "5555555"]),
    ("EKLRT MNOPQ abcde", ["ekLRT", "MNOPQ", "XYZAB", "ABCDE", "QWERT"]),
    ("1. poet 2. enter", ["poet"]),
    ("nothing", ["Normandy", "France"]),
    ("", ["yes"]),
]


@pytest.mark.parametrize("prediction,answers", CASES)
def test_same_scores_as_rulers_metric_functions(prediction, answers):
    ruler = pytest.importorskip("long_context_eval.eval.synthetic.constants")
    assert 100 * string_match_all(prediction, answers) == pytest.approx(
        ruler.string_match_all_per_sample([prediction], [answers])[0])
    assert 100 * string_match_part(prediction, answers) == pytest.approx(
        ruler.string_match_part_per_sample([prediction], [answers])[0])
