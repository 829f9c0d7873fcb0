"""Examples, prompts and the demo's default task ("extract").

The "extract" task: pull name, age and city out of a sentence into fixed JSON.

    sentence: "Born 41 years ago, Priya now calls Lisbon home."
    answer:   {"name": "Priya", "age": 41, "city": "Lisbon"}

A base chat model already reads these facts (its content score is high), but does
not know this exact output format (it adds prose or code fences, spreads the object
over lines, quotes the age), so its exact match is low: fine-tuning here mostly
teaches the format. `routing.py` holds the task where the content itself is learnt.
Examples are generated from a fixed seed; the held-out split never repeats a
training sentence.

Every task (and a user's own data, `owndata.py`) produces `Example`s: the chat turns
the model sees and the answer it should write.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from examples.scoring import exact_match as _exact_match
from examples.scoring import scores

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

Turn = tuple[str, str]  # (role, content): role is "system", "user" or "assistant"


@dataclass(frozen=True)
class Example:
    """One example: the chat turns before the answer, and the answer to write."""

    turns: tuple[Turn, ...]  # ends with the user's turn; the answer is the assistant's reply
    answer: str  # exact expected reply (JSON for the built-in tasks)
    source: str = ""  # the input shown in reports (the sentence); "" = the last user turn
    entities: tuple[str, ...] = ()  # names in the input; "route" keeps them out of training
    line: int = 0  # line of the user's data file it came from; 0 = generated

    @property
    def shown(self) -> str:
        return self.source or self.turns[-1][1]


def chat(messages: list[Turn], add_generation_prompt: bool = True) -> str:
    """ChatML text of (role, content) turns: SmolLM2's chat template without the default
    system turn it adds (the built-in tasks' numbers were measured with this prompt)."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class ChatFormat:
    """How turns become a prompt, and what ends the answer (generation stops there)."""

    render: Callable[[list[Turn]], str] = chat  # turns -> text ending where the reply starts
    end: str = "<|im_end|>"  # end-of-turn text after the answer: the tokenizer's eos token


CHATML = ChatFormat()


def user_message(sentence: str, instruction: str = INSTRUCTION) -> str:
    return f"{instruction}\nSentence: {sentence}"


def wrap(sentence: str) -> Example:
    """The example of a new sentence (no known answer), for --generate."""
    return Example((("user", user_message(sentence)),), "", source=sentence)


def make_example(rng: random.Random) -> Example:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    return Example((("user", user_message(sentence)),),
                   json.dumps({"name": name, "age": age, "city": city}),
                   source=sentence, entities=(name, city))


def make_splits(n_train: int = 400, n_eval: int = 100, seed: int = 0
                ) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples, generated from `seed`; no sentence is in both."""
    check_sizes(n_train, n_eval)
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n_train + n_eval:
        ex = make_example(rng)
        if ex.source not in seen:
            seen.add(ex.source)
            out.append(ex)
    return out[:n_train], out[n_train:]


def check_sizes(n_train: int, n_eval: int) -> None:
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")


def prompt(example: Example, shots: list[Example] = (), fmt: ChatFormat = CHATML) -> str:
    """The chat prompt of `example`; `shots` are solved examples shown first
    as earlier turns of the chat (in-context learning, weights untouched)."""
    turns: list[Turn] = []
    for shot in shots:
        turns += [*shot.turns, ("assistant", shot.answer)]
    turns += example.turns
    return fmt.render(turns)


def completion(example: Example, fmt: ChatFormat = CHATML) -> str:
    """What the model should write after the prompt, end-of-turn token included."""
    return example.answer + fmt.end


def exact_match(prediction: str, example: Example) -> bool:
    """True when the prediction, stripped of surrounding whitespace, is the answer."""
    return _exact_match(prediction, example.answer)


def accuracy(predictions: list[str], examples: list[Example]) -> float:
    """Exact-match accuracy (see `scoring.scores` for the content score too)."""
    return scores(predictions, [e.answer for e in examples])["exact"]
