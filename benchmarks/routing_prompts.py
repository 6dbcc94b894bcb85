"""The mixed prompt set of ``benchmarks.bench_routing``: four kinds of short tasks with one
checkable answer each, written as few-shot text completions (both models are served as text
completers: Gemma 3 270M is a base model, and SmolLM2's chat template would favour it).

- arithmetic: sums of two one-digit numbers, and the next term of an arithmetic sequence
  (answer: the number);
- copy: repeat a given word (answer: the word);
- extract: the weekday named in a sentence (answer: the weekday);
- facts: the capital of a country (answer: the city).

An answer is correct when the first word of the completion (stripped of punctuation) is the
expected one. The set is generated, deterministic, and the same on every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_WORDS = ("table", "river", "garden", "pencil", "window", "silver", "rabbit", "candle",
          "mirror", "orange", "bridge", "jacket", "planet", "violin", "forest", "ladder")
_NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EVENTS = ("the meeting", "the dentist appointment", "the football match", "the concert",
           "the exam", "the party", "the flight", "the interview")
_CAPITALS = (("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
             ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
             ("England", "London"), ("China", "Beijing"), ("Canada", "Ottawa"),
             ("Australia", "Canberra"), ("Portugal", "Lisbon"), ("Norway", "Oslo"),
             ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Poland", "Warsaw"), ("Austria", "Vienna"))
KINDS = ("arithmetic", "copy", "extract", "facts")


@dataclass(frozen=True, slots=True)
class Item:
    kind: str
    prompt: str
    answer: str


def _arithmetic(rng: random.Random, n: int) -> list[Item]:
    shots = "1 + 1 = 2\n2 + 3 = 5\n4 + 4 = 8\n3 + 1 = 4\n"
    items = []
    for i in range(n):
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        if i % 2:  # the next term of a sequence starting at a, step b
            items.append(Item("arithmetic", f"{a}, {a + b}, {a + 2 * b}, {a + 3 * b},",
                              str(a + 4 * b)))
        else:
            items.append(Item("arithmetic", f"{shots}{a} + {b} =", str(a + b)))
    return items


def _copy(rng: random.Random, n: int) -> list[Item]:
    shots = "Repeat the word.\nword: apple -> apple\nword: green -> green\n"
    return [Item("copy", f"{shots}word: {w} ->", w) for w in rng.sample(_WORDS, n)]


def _extract(rng: random.Random, n: int) -> list[Item]:
    shots = ("Text: Tom said the picnic is on Friday.\nDay: Friday\n\n"
             "Text: We moved the lesson to Monday afternoon.\nDay: Monday\n\n")
    items = []
    for _ in range(n):
        name, event, day = rng.choice(_NAMES), rng.choice(_EVENTS), rng.choice(_DAYS)
        text = f"{name} told me that {event} will take place on {day} evening."
        items.append(Item("extract", f"{shots}Text: {text}\nDay:", day))
    return items


def _facts(rng: random.Random, n: int) -> list[Item]:
    shots = ("Q: What is the capital of France?\nA: Paris\n\n"
             "Q: What is the capital of Sweden?\nA: Stockholm\n\n")
    return [Item("facts", f"{shots}Q: What is the capital of {country}?\nA:", city)
            for country, city in rng.sample(_CAPITALS, n)]


def prompt_set(per_kind: int = 16, seed: int = 17) -> list[Item]:
    """``per_kind`` items of each kind, interleaved."""
    rng = random.Random(seed)
    groups = [_arithmetic(rng, per_kind), _copy(rng, per_kind), _extract(rng, per_kind),
              _facts(rng, per_kind)]
    return [group[i] for i in range(per_kind) for group in groups]


def is_correct(item: Item, completion: str) -> bool:
    words = completion.strip().split()
    return bool(words) and words[0].strip(".,;:!?\"'") == item.answer
