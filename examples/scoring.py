"""Scores of a generated answer: exact match (format and content) and content alone.

Exact match asks for the answer character for character, so it measures the output
format as much as what was understood. The content score reads the answer as JSON
wherever it can and counts the expected fields it got right, so a model that writes
the right facts in another layout still scores. Side by side, the two separate
"learnt the format" from "learnt the content".

Content score rules (`field_score`):

- The JSON object is found in the text: surrounding prose and Markdown code fences
  are ignored; the first object (from the first "{") is used.
- A truncated object (generation stopped before its closing "}") is closed: the
  members complete so far count, an unfinished last member is dropped. (`finetune.py`
  lets answers run to twice the expected length + 8 tokens, so a verbose layout is
  rarely cut; a model that rambles on is.)
- Each expected field scores 1 when the answer has the same key with the same value;
  the score is the fraction of fields right. Missing fields score 0; extra fields
  cost nothing here (exact match penalises them).
- Values compare as JSON values with their types: the number 26 is not the string
  "26" (a program reading the answer sees a different thing), 26 equals 26.0, true is
  not 1, strings are compared exactly (case and spaces count).
- No object at all (plain prose, a list, broken JSON) scores 0.
"""
from __future__ import annotations

import json
import re

_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"```[a-zA-Z]*")  # ``` or ```json: a Markdown code fence marker


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction, stripped of surrounding whitespace, is the answer."""
    return prediction.strip() == answer


def parse_object(text: str) -> dict | None:
    """The first JSON object in `text` (see the module docstring), or None."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = _FENCE.sub("", text)
    start = text.find("{")
    if start < 0:
        return None
    body = text[start:]
    try:
        value, _ = _DECODER.raw_decode(body)  # stops at the object's end: trailing prose is fine
    except json.JSONDecodeError:
        value = _close_truncated(body)
    return value if isinstance(value, dict) else None


def _close_truncated(body: str) -> dict | None:
    """Close an object cut off before its "}": try the whole text, then shorter prefixes
    ending just before a comma (dropping an unfinished last member), each plus "}"."""
    cuts = [len(body)] + [i for i in range(len(body) - 1, 0, -1) if body[i] == ","]
    for cut in cuts:
        try:
            value = json.loads(body[:cut].rstrip().rstrip(",") + "}")
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def same_value(got, want) -> bool:
    """JSON equality that keeps types apart: 26 != "26", True != 1, 26 == 26.0."""
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(got, bool) and isinstance(want, bool) and got == want
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and got == want
    if isinstance(want, dict):
        return (isinstance(got, dict) and got.keys() == want.keys()
                and all(same_value(got[k], want[k]) for k in want))
    if isinstance(want, list):
        return (isinstance(got, list) and len(got) == len(want)
                and all(same_value(g, w) for g, w in zip(got, want, strict=True)))
    return type(got) is type(want) and got == want


def field_score(prediction: str, expected: dict) -> float:
    """Fraction of the expected JSON fields the prediction gets right (0.0 to 1.0)."""
    if not isinstance(expected, dict) or not expected:
        raise ValueError(f"expected must be a non-empty dict of fields, got {expected!r}")
    got = parse_object(prediction)
    if got is None:
        return 0.0
    return sum(k in got and same_value(got[k], v) for k, v in expected.items()) / len(expected)


def expected_fields(answer: str) -> dict | None:
    """The answer's fields when it is exactly one JSON object, else None (no content score)."""
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and value else None


def scores(predictions: list[str], answers: list[str]) -> dict[str, float | None]:
    """{"exact": fraction exactly right, "content": mean field score, or None when
    some answer is not a JSON object (then there are no fields to score)}."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("scores of an empty list of answers")
    exact = sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)
    fields = [expected_fields(a) for a in answers]
    if any(f is None for f in fields):
        return {"exact": exact, "content": None}
    content = sum(field_score(p, f) for p, f in zip(predictions, fields, strict=True)) / len(answers)
    return {"exact": exact, "content": content}
