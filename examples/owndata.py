"""Your own data: a JSONL file of examples, checked line by line, and a seeded split.

Each non-blank line is one JSON object in one of two forms:

    {"prompt": "Translate to French: cheese", "completion": "fromage"}
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Capital of Peru?"},
                  {"role": "assistant", "content": "Lima"}]}

A prompt becomes the user's turn of the chat; the completion (or the last assistant
message) is what the model learns to reply. In the chat form, an optional system
message comes first, then user and assistant turns alternate, ending with the
assistant's; earlier assistant turns are context, only the last one is learnt.
Any other shape is an error that names the line: nothing is trained or written
from a file that is not valid throughout. Blank lines are skipped.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from examples.task import Example, Turn

ROLES = ("system", "user", "assistant")
FORMS = ({"prompt", "completion"}, {"messages"})


def _fail(line: int, problem: str, kind: type[Exception] = ValueError):
    raise kind(f"line {line}: {problem}")


def _text(value, what: str, line: int) -> str:
    """A non-empty string, else TypeError (not a string) or ValueError (empty)."""
    if not isinstance(value, str):
        _fail(line, f"{what} must be a string, got {type(value).__name__}", TypeError)
    if not value.strip():
        _fail(line, f"{what} is empty")
    return value


def _check_keys(record: dict, line: int) -> set[str]:
    keys = set(record)
    if keys in FORMS:
        return keys
    form = FORMS[1] if "messages" in keys else FORMS[0]
    missing, extra = sorted(form - keys), sorted(keys - form)
    _fail(line, f"expected the keys {sorted(FORMS[0])} or {sorted(FORMS[1])}; "
                f"missing {missing}, unexpected {extra}")


def _turns(messages, line: int) -> list[Turn]:
    """Validated (role, content) turns: [system], user, assistant, user, ..., assistant."""
    if not isinstance(messages, list):
        _fail(line, f"'messages' must be a list, got {type(messages).__name__}", TypeError)
    if not messages:
        _fail(line, "'messages' is empty")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            _fail(line, f"{where} must be an object, got {type(m).__name__}", TypeError)
        if set(m) != {"role", "content"}:
            _fail(line, f"{where} must have exactly the keys 'role' and 'content', got {sorted(m)}")
        if m["role"] not in ROLES:
            _fail(line, f"{where}.role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        turns.append((m["role"], _text(m["content"], f"{where}.content", line)))
    _check_order([r for r, _ in turns], line)
    return turns


def _check_order(roles: list[str], line: int) -> None:
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if role != want:
            _fail(line, f"messages[{i}].role is {role!r} where {want!r} is expected "
                        "(an optional system message, then user and assistant alternating)")
    if roles[-1] != "assistant":
        _fail(line, "the last message must be the assistant's (the reply to learn)")


def example_from_record(record, line: int) -> Example:
    """The `Example` of one parsed line (see the module docstring for the forms)."""
    if not isinstance(record, dict):
        _fail(line, f"expected a JSON object, got {type(record).__name__}", TypeError)
    if _check_keys(record, line) == FORMS[0]:
        user = _text(record["prompt"], "'prompt'", line)
        answer = _text(record["completion"], "'completion'", line)
        return Example((("user", user),), answer, line=line)
    turns = _turns(record["messages"], line)
    return Example(tuple(turns[:-1]), turns[-1][1], line=line)


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Every example of a JSONL file; ValueError/TypeError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples = []
    for line, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: line {line}: not UTF-8 text ({e.reason})") from e
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line}: not valid JSON ({e.msg}, column {e.colno})") from e
        try:
            examples.append(example_from_record(record, line))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from e
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty or blank)")
    return examples


def split(examples: list[Example], eval_fraction: float, seed: int = 0
          ) -> tuple[list[Example], list[Example]]:
    """Shuffle with `seed` and hold out round(eval_fraction * n) examples for evaluation."""
    if not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}")
    n = len(examples)
    n_eval = round(eval_fraction * n)
    if n_eval == 0 or n_eval == n:
        raise ValueError(f"eval_fraction={eval_fraction} of {n} examples leaves {n - n_eval} for "
                         f"training and {n_eval} held out; both need at least one")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
