"""The fine-tuning task: pull name, age and city out of a sentence into fixed JSON.

Example (one of many sentence templates):

    sentence: "Born 41 years ago, Priya now calls Lisbon home."
    answer:   {"name": "Priya", "age": 41, "city": "Lisbon"}

Scored by exact match of the whole answer. A base chat model can read the facts but
does not know this exact output format, so it fails zero-shot (it adds prose, code
fences, other keys or quotes the age); a few minutes of fine-tuning teach the format.
Examples are generated from a fixed seed; the held-out split never repeats a
training sentence.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

INSTRUCTION = "Extract the person's name, age and city from this sentence as JSON."

NAMES = """Alice Bruno Chen Dmitri Elena Farah Gustavo Hana Ibrahim Julia Kwame Lena Mateo
Nadia Oscar Priya Quentin Rosa Sanjay Tomas Uma Viktor Wen Ximena Yusuf Zara Amara Boris
Carmen Diego Esther Felix Greta Hugo Ingrid Jonas Keiko Lars Maya Nikolai Olga Pablo Rania
Stefan Tariq Ursula Vera Wiktor Yara Zoltan Aisha Bjorn Chloe Dario Emeka Freya Giorgio
Helga Ivan Jamal""".split()

CITIES = """Paris Lisbon Nairobi Osaka Toronto Lima Oslo Cairo Denver Hanoi Krakow Quito Dublin
Seville Austin Mumbai Perth Bogota Helsinki Accra Porto Vienna Santiago Tunis Boston Leeds
Manila Zurich Dakar Havana Prague Seattle Istanbul Munich Kyoto Athens Chicago Glasgow
Montreal Valencia Cusco Tbilisi Bergen Lagos Hamburg Bristol Geneva Phoenix""".split()

TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "In {city}, {name} just turned {age}.",
    "{name}, aged {age}, moved to {city} last spring.",
    "Born {age} years ago, {name} now calls {city} home.",
    "The {age}-year-old {name} works in {city}.",
    "{city} is where {name} lives; {name} is {age}.",
    "At {age}, {name} opened a small bakery in {city}.",
    "Our new neighbour in {city} is {name}, who is {age}.",
    "{name} ({age}) was spotted cycling through {city}.",
    "Having lived in {city} all their life, {name} celebrated turning {age}.",
    "Records show {name}, age {age}, resident of {city}.",
]


@dataclass(frozen=True)
class Example:
    """One task example: the input sentence and the exact expected answer."""

    sentence: str
    answer: str  # one line of JSON, keys in the order name, age, city


def make_example(rng: random.Random) -> Example:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    return Example(sentence, json.dumps({"name": name, "age": age, "city": city}))


def make_splits(n_train: int = 400, n_eval: int = 100, seed: int = 0
                ) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples, generated from `seed`; no sentence is in both."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n_train + n_eval:
        ex = make_example(rng)
        if ex.sentence not in seen:
            seen.add(ex.sentence)
            out.append(ex)
    return out[:n_train], out[n_train:]


def chat(messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML text of (role, content) turns, as SmolLM2's chat template writes it."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def user_message(sentence: str) -> str:
    return f"{INSTRUCTION}\nSentence: {sentence}"


def prompt(example: Example, shots: list[Example] = ()) -> str:
    """The ChatML prompt of `example`; `shots` are solved examples shown first
    as earlier turns of the chat (in-context learning, weights untouched)."""
    turns = []
    for shot in shots:
        turns += [("user", user_message(shot.sentence)), ("assistant", shot.answer)]
    turns.append(("user", user_message(example.sentence)))
    return chat(turns)


def completion(example: Example) -> str:
    """What the model should write after the prompt, end-of-turn token included."""
    return example.answer + "<|im_end|>"


def exact_match(prediction: str, example: Example) -> bool:
    """True when the prediction, stripped of surrounding whitespace, is the answer."""
    return prediction.strip() == example.answer


def accuracy(predictions: list[str], examples: list[Example]) -> float:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("accuracy of an empty list of examples")
    return sum(exact_match(p, e) for p, e in zip(predictions, examples, strict=True)) / len(examples)
