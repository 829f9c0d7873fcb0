"""The content scorer (examples/scoring.py): exact cases of what counts as right."""

import pytest

from examples.scoring import expected_fields, field_score, parse_object, same_value, scores

WANT = {"name": "Ximena", "age": 26, "city": "Paris"}
ANSWER = '{"name": "Ximena", "age": 26, "city": "Paris"}'


@pytest.mark.parametrize("prediction, score", [
    (ANSWER, 1.0),                                                       # correct
    ('{"name": "Ximena", "age": 27, "city": "Paris"}', 2 / 3),          # one field wrong
    ('{"name": "Ximena", "city": "Paris"}', 2 / 3),                      # one field missing
    ('{"name": "Ximena", "age": 26, "city": "Paris", "job": "cook"}', 1.0),  # extra field: free here
    ('Sure! Here is the JSON: {"name": "Ximena", "age": 26, "city": "Paris"} Hope it helps.', 1.0),
    ('```json\n{"name": "Ximena", "age": 26, "city": "Paris"}\n```', 1.0),  # code fence
    ('{\n  "name": "Ximena",\n  "age": 26,\n  "city": "Paris"\n', 1.0),  # truncated before "}"
    ('{\n  "name": "Ximena",\n  "age": 26,\n  "city": "Par', 2 / 3),     # unfinished member dropped
    ('{"name": "Ximena", "age": "26", "city": "Paris"}', 2 / 3),         # "26" is not 26
    ('{"name": "ximena", "age": 26.0, "city": "Paris"}', 2 / 3),         # case counts; 26.0 == 26
    ("Ximena is 26 and lives in Paris.", 0.0),                           # not JSON at all
    ('["Ximena", 26, "Paris"]', 0.0),                                    # JSON, but not an object
    ('{"name": Ximena, age: 26}', 0.0),                                  # broken JSON
    ("", 0.0),
])
def test_field_score_cases(prediction, score):
    assert field_score(prediction, WANT) == pytest.approx(score)


def test_parse_object_takes_the_first_object_and_rejects_non_strings():
    assert parse_object('{"a": 1} {"a": 2}') == {"a": 1}
    assert parse_object('text {"a": {"b": [1, 2]}} more') == {"a": {"b": [1, 2]}}
    assert parse_object("no braces") is None
    with pytest.raises(TypeError, match="text must be a str"):
        parse_object(None)


def test_same_value_keeps_types_apart():
    assert same_value(26, 26.0) and not same_value("26", 26) and not same_value(26, "26")
    assert not same_value(True, 1) and not same_value(1, True) and same_value(False, False)
    assert same_value([1, "a"], [1, "a"]) and not same_value([1], [1, 2])
    assert same_value({"x": 1}, {"x": 1.0}) and not same_value({"x": 1}, {"x": 1, "y": 2})
    assert same_value(None, None) and not same_value(None, "null")


def test_scores_exact_and_content_side_by_side():
    preds = [ANSWER, '{\n  "name": "Ximena",\n  "age": 26,\n  "city": "Paris"\n', "Paris"]
    got = scores(preds, [ANSWER] * 3)
    assert got["exact"] == pytest.approx(1 / 3) and got["content"] == pytest.approx(2 / 3)
    # Answers that are not JSON objects have no fields: content is None, exact still counts.
    assert scores(["hello", "x"], ["hello", "bye"]) == {"exact": 0.5, "content": None}
    assert expected_fields("[1]") is None and expected_fields("{}") is None
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        scores([], [])
    with pytest.raises(ValueError, match="expected must be a non-empty dict"):
        field_score("{}", {})
