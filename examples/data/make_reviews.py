"""Write `reviews.jsonl`, the example data file of `finetune.py --data` (seeded, 120 lines).

Each line is a product review and its summary as one line of JSON, in the two forms
`finetune.py --data` reads: `{"prompt", "completion"}` for even lines, the chat form
`{"messages": [system, user, assistant]}` for odd ones.

    python examples/data/make_reviews.py   # rewrites examples/data/reviews.jsonl
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from examples.report import atomic_write_text

BRANDS = "Nimbus Aero Kodo Brava Luma Pico Tessa Vanta Orla Zephyr Miko Rune".split()
ITEMS = ["headphones", "blender", "desk chair", "phone case", "rain jacket", "coffee maker",
         "running shoes", "backpack", "keyboard", "water bottle"]
POSITIVE = [
    "I bought the {p} last month and it is fantastic. {s} stars.",
    "The {p} does exactly what it promises. Worth every penny, {s}/5.",
    "Really happy with my {p}: solid, quiet and good looking. Rating: {s} stars.",
    "Gave the {p} to my sister and she loves it. {s} out of 5.",
]
NEGATIVE = [
    "The {p} broke after a week. {s} star{plural}, would not buy again.",
    "Disappointed with the {p}; it feels cheap and arrived scratched. {s}/5.",
    "My {p} stopped working within days and support never answered. Rating: {s} star{plural}.",
    "The {p} looks nothing like the photos. {s} out of 5.",
]
INSTRUCTION = "Summarize this review as JSON with the keys product, sentiment and stars."
SYSTEM = "You turn product reviews into one line of JSON: product, sentiment, stars."


def review(rng: random.Random) -> tuple[str, str]:
    product = f"{rng.choice(BRANDS)} {rng.choice(ITEMS)}"
    positive = rng.random() < 0.5
    stars = rng.choice([4, 5]) if positive else rng.choice([1, 2])
    text = rng.choice(POSITIVE if positive else NEGATIVE).format(
        p=product, s=stars, plural="" if stars == 1 else "s")
    summary = {"product": product, "sentiment": "positive" if positive else "negative", "stars": stars}
    return text, json.dumps(summary)


def line(i: int, text: str, summary: str) -> str:
    if i % 2 == 0:
        return json.dumps({"prompt": f"{INSTRUCTION}\n{text}", "completion": summary})
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": text},
                                    {"role": "assistant", "content": summary}]})


def main(n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [line(i, *review(rng)) for i in range(n)]
    path = Path(__file__).with_name("reviews.jsonl")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(main())
