"""The "route" task: name a customer message's topic and the team that handles it.

    message: "From: Noor | My Velto kettle arrived with a cracked lid."
    answer:  {"topic": "defect", "team": "echo"}

Every company names its topics and teams its own way: here eight topic labels and
eight made-up team code names, one per topic. No pretrained model can know them, so
the base model is wrong in *content*, not only in format; a few hundred examples
teach the rule, and the held-out split checks that it is applied to customers and
brands never seen in training (the two splits share no name and no brand; they share
the four phrasings per topic, so a message worded quite differently may be misrouted).

Why the topic comes first: asked for the team code alone, QLoRA needed far more than
the demo's budget (20-30% held-out after 40 steps, measured); naming the topic first
lets the model use what it already knows about the message's words, and the code
then follows from the topic word just written (100% after 40 steps).
"""
from __future__ import annotations

import json
import random

from examples.task import Example, check_sizes

INSTRUCTION = ('Route this customer message to the team that handles it. '
               'Answer with JSON: {"topic": "<topic>", "team": "<team code>"}.')

# topic -> (team code, message templates). Codes are arbitrary words with no link to the topic,
# each one token in SmolLM2's vocabulary (the team is one decision, not a spelling exercise).
TOPICS = {
    "billing": ("winter", [
        "I was charged twice for my {product}.",
        "The invoice for my {product} shows the wrong amount.",
        "Why did my card get billed again for the {product}?",
        "The price I paid for the {product} is higher than the one on your site.",
    ]),
    "delivery": ("pixel", [
        "My {product} still has not arrived, the tracking has not moved in a week.",
        "The courier left my {product} at the wrong address.",
        "When will my {product} be delivered? It is ten days late.",
        "The parcel with my {product} was marked delivered but I never got it.",
    ]),
    "login": ("river", [
        "I cannot log in to my account since I ordered the {product}.",
        "The password reset email never comes, so I cannot sign in to check my {product} order.",
        "My account is locked after too many login attempts; I wanted to review my {product} order.",
        "The two-factor code is rejected every time I try to sign in about my {product}.",
    ]),
    "returns": ("ember", [
        "I would like to return my {product}, it does not fit my needs.",
        "I sent the {product} back three weeks ago and still have no refund.",
        "How do I get a return label for my {product}?",
        "Can I exchange my {product} for a different colour?",
    ]),
    "defect": ("echo", [
        "My {product} arrived with a cracked case.",
        "The {product} stopped working after two days.",
        "The {product} makes a loud buzzing noise and smells of burning.",
        "One of the buttons on my {product} is broken.",
    ]),
    "subscription": ("orbit", [
        "Please cancel my monthly plan; I only needed it for the {product}.",
        "How do I switch my subscription to the yearly plan? I use it with my {product}.",
        "My subscription renewed without warning, I only use it for the {product}.",
        "I want to pause my membership for two months, the {product} is enough for now.",
    ]),
    "privacy": ("delta", [
        "Please delete all the personal data you hold about me, including my {product} order.",
        "I want a copy of every piece of data you store about me and my {product} purchase.",
        "Stop sending me marketing emails about the {product}.",
        "Who did you share my address with after I bought the {product}?",
    ]),
    "feedback": ("anchor", [
        "Love my {product}! It would be great if it came in more colours.",
        "A suggestion: the {product} app should have a dark mode.",
        "Just wanted to say the {product} is the best thing I bought this year.",
        "Idea for the next {product}: a longer cable would help a lot.",
    ]),
}
TEAMS = {topic: code for topic, (code, _) in TOPICS.items()}

NAMES = """Noor Aiko Bram Cleo Dana Emil Fenna Gil Hiro Ines Jorge Kira Leon Mina Nils Omar
Paula Reza Sofia Theo Una Vik Wanda Xavi Yuki Zeno Abel Bea Cyrus Delia Eero Flor Gael Hedda
Idris Jana Kofi Lumi Marek Nia Otto Pia Rafe Saskia Tuva Ugo Valo Wim Yael Zita""".split()
BRANDS = """Velto Lumo Brisk Nuvo Pelta Zarik Quell Orvo Danto Fjell Kiro Mavi Solva Tandri
Ubbe Yarro Corvi Elmo Gresk Haldo Iveo Jolt Kesta Norra""".split()
ITEMS = ["kettle", "speaker", "backpack", "desk lamp", "headphones", "blender", "smartwatch",
         "router", "air fryer", "yoga mat", "e-reader", "coffee grinder"]
HELD_OUT_SHARE = 0.25  # of the names and brands, reserved for the held-out split


def entity_pools(seed: int) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """(names, brands) for training and for the held-out split: disjoint, seeded."""
    rng = random.Random(f"route-pools-{seed}")
    names, brands = NAMES[:], BRANDS[:]
    rng.shuffle(names)
    rng.shuffle(brands)
    n_names, n_brands = round(HELD_OUT_SHARE * len(names)), round(HELD_OUT_SHARE * len(brands))
    return (names[n_names:], brands[n_brands:]), (names[:n_names], brands[:n_brands])


def wrap(message: str) -> Example:
    """The example of a new message (no known answer), for --generate."""
    return Example((("user", f"{INSTRUCTION}\nMessage: {message}"),), "", source=message)


def make_example(rng: random.Random, names: list[str], brands: list[str]) -> Example:
    topic = rng.choice(list(TOPICS))
    code, templates = TOPICS[topic]
    name, brand = rng.choice(names), rng.choice(brands)
    message = f"From: {name}\n" + rng.choice(templates).format(product=f"{brand} {rng.choice(ITEMS)}")
    return Example(wrap(message).turns, json.dumps({"topic": topic, "team": code}),
                   source=message.replace("\n", " | "), entities=(name, brand))


def _generate(n: int, rng: random.Random, names: list[str], brands: list[str]) -> list[Example]:
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        ex = make_example(rng, names, brands)
        if ex.source not in seen:
            seen.add(ex.source)
            out.append(ex)
    return out


def make_splits(n_train: int = 400, n_eval: int = 100, seed: int = 0
                ) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples from `seed`; the held-out ones use other customers'
    names and other brands than any training example (every topic appears in both)."""
    check_sizes(n_train, n_eval)
    (train_names, train_brands), (eval_names, eval_brands) = entity_pools(seed)
    rng = random.Random(seed)
    return (_generate(n_train, rng, train_names, train_brands),
            _generate(n_eval, rng, eval_names, eval_brands))
