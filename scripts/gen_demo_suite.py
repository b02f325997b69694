#!/usr/bin/env python3
"""Generate the demo suite, ``config/suites/demo.json`` (task ``answer-only``), from a seed.

Run it with the project's Python::

    .venv/bin/python scripts/gen_demo_suite.py      # seed 7, writes config/suites/demo.json
    .venv/bin/python scripts/gen_demo_suite.py --seed 8 --out /tmp/demo.json

The same seed always gives the same file (``tests/unit/test_suites.py`` checks that the shipped
file is this script's output for the default seed); another seed gives fresh pools, which is how
the demo's gate and holdout are rotated.

The cases are short questions from five families: arithmetic, counting, formats (dates, units,
casing, JSON), extraction (a value pulled out of a sentence) and classification (sentiment,
odd-one-out, parity, ...). Each has one unambiguous answer and a programmatic check of the kinds
``exact``, ``any_of``, ``number`` or ``json_shape`` (no ``regex``: the scripted test agent cannot
answer a pattern). About 70% of every split are format-sensitive checks (``exact``, ``any_of``,
``json_shape``) that a right answer wrapped in a sentence fails, so a prompt asking for only the
final answer is a large, clear lift; the rest are ``number`` checks, which measure content only.
Every input is distinct across learn, gate and holdout.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratchet.contracts import Check
from ratchet.suites import Case, Suite, save_suite

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SEED = 7
DEFAULT_OUT = REPO / "config" / "suites" / "demo.json"
SPLIT_SIZES = {"gate": 220, "holdout": 80, "learn": 40}  # 44, 16 and 8 cases per family
# The gate pool: the test measures up to 200 cases and keeps 20 for the check after applying
# (the drift benchmark's targets hold at that size, not at 160: docs/benchmarks.md, "Pool size").
NUMBER_SHARE = 0.3  # the rest are exact / any_of / json_shape
MAX_INPUT_CHARS = 100  # the demo also runs on a 135M-parameter local model
MAX_DRAWS = 500

TASK = "answer-only"
PROMPT = "Help the user."
DESCRIPTION = (
    "Short questions in five families (arithmetic, counting, formats, extraction, "
    "classification) whose checks want the bare answer. The initial prompt is deliberately weak: "
    "a prompt that asks for only the final answer in the requested format should pass measurably "
    "more gate cases. The holdout is sealed: it is measured only after a change is kept."
)

Draft = tuple[str, Check]
Maker = Callable[[random.Random], Draft]


@dataclass(frozen=True)
class Template:
    slug: str
    make: Maker
    number: bool  # does it produce a ``number`` check


# --- vocabulary ---------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
WORDS = _words(
    "apple house river table garden window pencil rabbit orange bottle candle planet mirror "
    "basket dragon forest button ladder silver winter market castle pillow turtle rocket "
    "lemon tiger stone cloud chair bread horse grape piano tomato banana paper water"
)
NAMES = _words("Ana Leo Maria Tom Sara Omar Nina Paul Eva Ivan Lucy Hugo Mia Sam Rosa Karl Zoe Ben")
CITIES = _words(
    "Oslo Paris Rome Madrid Lisbon Vienna Dublin Prague Athens Berlin Cairo Lima Tokyo Seoul "
    "Quito Warsaw Budapest Helsinki"
)
COLOURS = _words("red blue green yellow black white purple brown pink grey")
THINGS = _words("car bike coat hat scarf bag kettle lamp sofa tent")
ITEMS = _words("pen cup book key coin spoon plate brush comb ball sock ring")
MONTHS = _words(
    "January February March April May June July August September October November December"
)
FRUITS = _words("apple banana pear plum cherry mango grape peach lemon kiwi melon apricot")
VEGETABLES = _words("carrot potato onion cabbage leek radish turnip parsnip beetroot")
MAMMALS = _words("whale dolphin horse cow dog cat bat lion goat rabbit")
FISH = _words("shark salmon trout tuna cod carp herring sardine")
GROUPS = {  # no word in two groups, and no fruit that is also a colour (cherry, lemon, ...)
    "fruit": ["apple", "banana", "pear", "mango", "grape", "kiwi", "melon"],
    "colour": COLOURS,
    "animal": ["horse", "cow", "dog", "cat", "lion", "goat", "tiger", "bear"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "spade"],
    "vehicle": ["car", "bus", "train", "truck", "tram", "bicycle"],
}
POSITIVE = [
    "I loved every minute of it.",
    "Great food and friendly staff.",
    "Best purchase I made this year.",
    "Works perfectly, highly recommended.",
    "A wonderful, relaxing stay.",
]
NEGATIVE = [
    "It broke after one day.",
    "The room was dirty and cold.",
    "A total waste of money.",
    "Rude staff and slow service.",
    "I want my money back.",
]
SUBJECTS = ["food", "service", "room", "film", "book", "hotel", "staff", "music", "show", "meal"]
GOOD = ["great", "excellent", "wonderful", "superb", "fantastic"]
BAD = ["terrible", "awful", "horrible", "dreadful", "useless"]
EVENTS = [
    "The bridge opened in {y}.",
    "She was born in {y} in Rome.",
    "The school was founded in {y}.",
    "They moved to Spain in {y}.",
    "The band split up in {y}.",
]
LEGS = {"dogs": 4, "cats": 4, "spiders": 8, "ducks": 2, "horses": 4, "ants": 6}
DOMAINS = ["mail.com", "shop.org", "work.net", "city.gov", "club.io"]


def _count(n: int) -> Check:
    """A count, accepted as digits or as a word (digits first: the bare answer)."""
    answers = [str(n), NUMBER_WORDS[n]] if n < len(NUMBER_WORDS) else [str(n)]
    return Check(kind="any_of", expected=answers)


def _exact(answer: str | int, *, case_sensitive: bool = False) -> Check:
    return Check(kind="exact", expected=str(answer), case_sensitive=case_sensitive)


def _number(value: int) -> Check:
    return Check(kind="number", expected=value)


def _json(shape: dict[str, Any]) -> Check:
    return Check(kind="json_shape", expected=shape)


def _listed(items: Sequence[str]) -> str:
    """``a, b and c`` for a list of nouns that each take ``a`` or ``an``."""
    named = [f"an {i}" if i[0] in "aeiou" else f"a {i}" for i in items]
    return ", ".join(named[:-1]) + " and " + named[-1]


# --- arithmetic ---------------------------------------------------------------------------------


def add(r: random.Random) -> Draft:
    a, b = r.randint(2, 60), r.randint(2, 60)
    return f"What is {a} + {b}?", _exact(a + b)


def subtract(r: random.Random) -> Draft:
    a = r.randint(12, 95)
    b = r.randint(2, a - 2)
    return f"What is {a} minus {b}?", _exact(a - b)


def times(r: random.Random) -> Draft:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"What is {a} times {b}?", _exact(a * b)


def divide(r: random.Random) -> Draft:
    b, q = r.randint(2, 9), r.randint(2, 12)
    return f"What is {b * q} divided by {b}?", _exact(q)


def next_in_sequence(r: random.Random) -> Draft:
    start, step = r.randint(1, 20), r.randint(2, 9)
    shown = ", ".join(str(start + step * i) for i in range(4))
    return f"What comes next: {shown}, ?", _exact(start + step * 4)


def half(r: random.Random) -> Draft:
    n = r.randint(3, 20)
    return f"What is half of {2 * n}?", _count(n)


def percent(r: random.Random) -> Draft:
    p = r.choice([10, 20, 25, 50])
    base = 20 * r.randint(1, 20)
    return f"What is {p}% of {base}?", _number(base * p // 100)


def total_cost(r: random.Random) -> Draft:
    a, b = r.randint(2, 30), r.randint(2, 30)
    return f"A book costs {a} dollars and a pen {b} dollars. What do both cost?", _number(a + b)


def squared(r: random.Random) -> Draft:
    n = r.randint(2, 15)
    return f"What is {n} squared?", _number(n * n)


# --- counting -----------------------------------------------------------------------------------


def letters(r: random.Random) -> Draft:
    word = r.choice(WORDS)
    return f"How many letters are in the word '{word}'?", _count(len(word))


def vowels(r: random.Random) -> Draft:
    word = r.choice(WORDS)
    return (
        f"How many vowels (a, e, i, o, u) are in the word '{word}'?",
        _count(sum(ch in "aeiou" for ch in word)),
    )


def letter_occurrences(r: random.Random) -> Draft:
    word = r.choice(WORDS)
    letter = r.choice(sorted(set(word)))
    return f"How many times does the letter '{letter}' appear in '{word}'?", _count(
        word.count(letter)
    )


def items_held(r: random.Random) -> Draft:
    held = r.sample(ITEMS, r.randint(2, 6))
    return f"I have {_listed(held)}. How many things do I have?", _count(len(held))


def words_in_sentence(r: random.Random) -> Draft:
    sentence = " ".join(r.sample(WORDS, r.randint(3, 8)))
    return f"How many words are in '{sentence}'?", _count(len(sentence.split()))


def days_in_weeks(r: random.Random) -> Draft:
    n = r.randint(2, 12)
    return f"How many days are in {n} weeks?", _number(7 * n)


def legs(r: random.Random) -> Draft:
    animal = r.choice(sorted(LEGS))
    n = r.randint(2, 9)
    return f"How many legs do {n} {animal} have in total?", _number(n * LEGS[animal])


def hours_in_days(r: random.Random) -> Draft:
    n = r.randint(2, 10)
    return f"How many hours are in {n} days?", _number(24 * n)


# --- formats: dates, units, casing, JSON --------------------------------------------------------


def _date(r: random.Random) -> tuple[int, int, int]:
    return r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)


def iso_date(r: random.Random) -> Draft:
    y, m, d = _date(r)
    return f"Write the date {MONTHS[m - 1]} {d}, {y} as YYYY-MM-DD.", _exact(f"{y}-{m:02d}-{d:02d}")


def dmy_date(r: random.Random) -> Draft:
    y, m, d = _date(r)
    return f"Write {y}-{m:02d}-{d:02d} as DD/MM/YYYY.", _exact(f"{d:02d}/{m:02d}/{y}")


def uppercase(r: random.Random) -> Draft:
    word = r.choice(WORDS)
    return f"Write the word '{word}' in capital letters.", _exact(word.upper(), case_sensitive=True)


def lowercase(r: random.Random) -> Draft:
    word = r.choice(WORDS)
    return f"Write the word '{word.upper()}' in lowercase letters.", _exact(
        word, case_sensitive=True
    )


def backwards(r: random.Random) -> Draft:
    word = r.choice(WORDS)
    return f"Write the word '{word}' backwards.", _exact(word[::-1])


def json_person(r: random.Random) -> Draft:
    name, age = r.choice(NAMES), r.randint(18, 80)
    return (
        f"Give a JSON object with keys name and age for: {name} is {age} years old.",
        _json({"name": name, "age": age}),
    )


def json_weather(r: random.Random) -> Draft:
    city, rainy = r.choice(CITIES), r.random() < 0.5
    weather = "raining" if rainy else "sunny"
    return (
        f"Give a JSON object with keys city and rainy (true or false) for: It is {weather} in "
        f"{city}.",
        _json({"city": city, "rainy": rainy}),
    )


def json_price(r: random.Random) -> Draft:
    thing, price = r.choice(THINGS), r.randint(5, 500)
    return (
        f"Give a JSON object with keys item and price for: A {thing} costs {price} dollars.",
        _json({"item": "str", "price": price}),
    )


def km_to_m(r: random.Random) -> Draft:
    n = r.randint(2, 40)
    return f"How many metres are in {n} kilometres?", _number(1000 * n)


def kg_to_g(r: random.Random) -> Draft:
    n = r.randint(2, 40)
    return f"How many grams are in {n} kilograms?", _number(1000 * n)


def m_to_cm(r: random.Random) -> Draft:
    n = r.randint(2, 40)
    return f"How many centimetres are in {n} metres?", _number(100 * n)


# --- extraction ---------------------------------------------------------------------------------


def email(r: random.Random) -> Draft:
    address = f"{r.choice(NAMES).lower()}@{r.choice(DOMAINS)}"
    sentence = r.choice(["Write to {a} by Friday", "Questions go to {a} today", "Reply to {a}"])
    return f"Find the email address: '{sentence.format(a=address)}'", _exact(address)


def year(r: random.Random) -> Draft:
    y = r.randint(1800, 2020)
    return f"What year is mentioned? '{r.choice(EVENTS).format(y=y)}'", _exact(y)


def person(r: random.Random) -> Draft:
    name = r.choice(NAMES)
    question, sentence = r.choice(
        [
            ("Who called?", "{n} called this morning."),
            ("Who sent the letter?", "The letter was sent by {n}."),
            ("Who won the race?", "{n} won the race on Sunday."),
            ("Who baked the cake?", "The cake was baked by {n}."),
        ]
    )
    return f"{question} '{sentence.format(n=name)}'", _exact(name)


def city(r: random.Random) -> Draft:
    place = r.choice(CITIES)
    sentence = r.choice(
        ["We flew to {c} last week.", "My aunt lives in {c}.", "Our train to {c} is late."]
    )
    return f"Which city is mentioned? '{sentence.format(c=place)}'", _exact(place)


def colour(r: random.Random) -> Draft:
    thing, shade = r.choice(THINGS), r.choice(COLOURS)
    return f"What colour is the {thing}? 'She bought a {shade} {thing}.'", _exact(shade)


def room(r: random.Random) -> Draft:
    n = r.randint(100, 999)
    return f"Which room? 'The meeting is in room {n} at noon.'", _exact(n)


def price(r: random.Random) -> Draft:
    thing, n = r.choice(THINGS), r.randint(5, 300)
    return f"How many dollars does the {thing} cost? 'The {thing} costs ${n}.'", _number(n)


def age(r: random.Random) -> Draft:
    name, n = r.choice(NAMES), r.randint(5, 90)
    return f"How old is {name}? '{name} turned {n} last May.'", _number(n)


def guests(r: random.Random) -> Draft:
    n = r.randint(3, 60)
    return f"How many people came? 'In the end {n} people came to the party.'", _number(n)


# --- classification -----------------------------------------------------------------------------


def sentiment(r: random.Random) -> Draft:
    positive = r.random() < 0.5
    if r.random() < 0.5:
        review = r.choice(POSITIVE if positive else NEGATIVE)
    else:
        review = f"The {r.choice(SUBJECTS)} was {r.choice(GOOD if positive else BAD)}."
    return (
        f"Is this review positive or negative? '{review}'",
        _exact("positive" if positive else "negative"),
    )


def parity(r: random.Random) -> Draft:
    n = r.randint(3, 999)
    return f"Is {n} odd or even?", _exact("even" if n % 2 == 0 else "odd")


def odd_one_out(r: random.Random) -> Draft:
    common, other = r.sample(sorted(GROUPS), 2)
    members = [w for w in GROUPS[common] if w not in GROUPS[other]]
    intruder = r.choice([w for w in GROUPS[other] if w not in GROUPS[common]])
    words = [*r.sample(members, 3), intruder]
    r.shuffle(words)
    return f"Which word does not belong: {', '.join(words)}?", _exact(intruder)


def fruit_or_vegetable(r: random.Random) -> Draft:
    fruit = r.random() < 0.5
    plant = r.choice(FRUITS if fruit else VEGETABLES)
    article = "an" if plant[0] in "aeiou" else "a"
    return (
        f"Is {article} {plant} a fruit or a vegetable?",
        _exact("fruit" if fruit else "vegetable"),
    )


def fish_or_mammal(r: random.Random) -> Draft:
    fish = r.random() < 0.5
    animal = r.choice(FISH if fish else MAMMALS)
    return f"Is a {animal} a fish or a mammal?", _exact("fish" if fish else "mammal")


def greater(r: random.Random) -> Draft:
    a, b = r.sample(range(1, 100), 2)
    return f"Is {a} greater than {b}? Yes or no?", _exact("yes" if a > b else "no")


def prime(r: random.Random) -> Draft:
    n = r.randint(2, 60)
    is_prime = all(n % d for d in range(2, int(n**0.5) + 1))
    return f"Is {n} a prime number? Yes or no?", _exact("yes" if is_prime else "no")


def largest(r: random.Random) -> Draft:
    numbers = r.sample(range(1, 200), 3)
    return f"Which is the largest: {', '.join(map(str, numbers))}?", _number(max(numbers))


def smallest(r: random.Random) -> Draft:
    numbers = r.sample(range(1, 200), 4)
    return f"Which is the smallest: {', '.join(map(str, numbers))}?", _number(min(numbers))


def count_even(r: random.Random) -> Draft:
    numbers = r.sample(range(1, 50), 5)
    return (
        f"How many of these numbers are even: {', '.join(map(str, numbers))}?",
        _number(sum(n % 2 == 0 for n in numbers)),
    )


def _family(number: Sequence[Maker], other: Sequence[Maker]) -> list[Template]:
    return [Template(m.__name__.replace("_", "-"), m, True) for m in number] + [
        Template(m.__name__.replace("_", "-"), m, False) for m in other
    ]


FAMILIES: dict[str, list[Template]] = {
    "arithmetic": _family(
        [percent, total_cost, squared], [add, subtract, times, divide, next_in_sequence, half]
    ),
    "counting": _family(
        [days_in_weeks, legs, hours_in_days],
        [letters, vowels, letter_occurrences, items_held, words_in_sentence],
    ),
    "formats": _family(
        [km_to_m, kg_to_g, m_to_cm],
        [
            iso_date,
            dmy_date,
            uppercase,
            lowercase,
            backwards,
            json_person,
            json_weather,
            json_price,
        ],
    ),
    "extraction": _family([price, age, guests], [email, year, person, city, colour, room]),
    "classification": _family(
        [largest, smallest, count_even],
        [sentiment, parity, odd_one_out, fruit_or_vegetable, fish_or_mammal, greater, prime],
    ),
}


# --- assembly -----------------------------------------------------------------------------------


def _draw(rng: random.Random, template: Template, taken: set[str]) -> Draft:
    """A draft from ``template`` whose input no other case has."""
    for _ in range(MAX_DRAWS):
        text, check = template.make(rng)
        if text not in taken:
            if len(text) > MAX_INPUT_CHARS:
                raise ValueError(f"{template.slug}: input longer than {MAX_INPUT_CHARS}: {text!r}")
            taken.add(text)
            return text, check
    raise ValueError(f"{template.slug}: no new input after {MAX_DRAWS} draws")


def _split(rng: random.Random, split: str, size: int, taken: set[str]) -> list[Case]:
    """``size`` cases, equal parts per family, ``NUMBER_SHARE`` of each part number checks."""
    per_family, extra = divmod(size, len(FAMILIES))
    cases: list[Case] = []
    counters: dict[str, int] = {}
    for index, templates in enumerate(FAMILIES.values()):
        count = per_family + (index < extra)
        n_number = round(count * NUMBER_SHARE)
        plan: list[Template] = []
        for wanted, pool in (
            (n_number, [t for t in templates if t.number]),
            (count - n_number, [t for t in templates if not t.number]),
        ):
            order = rng.sample(pool, len(pool))  # every template once before any repeats
            plan.extend(order[i % len(order)] for i in range(wanted))
        for template in plan:
            text, check = _draw(rng, template, taken)
            counters[template.slug] = counters.get(template.slug, 0) + 1
            case_id = f"{split}-{template.slug}-{counters[template.slug]:02d}"
            cases.append(Case(id=case_id, input=text, check=check))
    rng.shuffle(cases)  # families interleaved, so any prefix is a mix
    return cases


# The question the README and the tests type by hand; always the first learn case.
README_CASE = Case(id="learn-add", input="What is 7 + 5?", check=Check(kind="exact", expected="12"))


def build_suite(seed: int = DEFAULT_SEED) -> Suite:
    """The demo suite for ``seed``: the same seed always gives the same suite."""
    rng = random.Random(seed)
    taken = {README_CASE.input}
    splits = {split: _split(rng, split, size, taken) for split, size in SPLIT_SIZES.items()}
    return Suite(
        name=TASK,
        description=DESCRIPTION,
        prompt=PROMPT,
        learn=[README_CASE, *splits["learn"]],
        gate=splits["gate"],
        holdout=splits["holdout"],
        source=(
            f"Generated by scripts/gen_demo_suite.py --seed {seed} (written for Ratchet's demo); "
            "run it with another --seed to rotate the pools."
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="default %(default)s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default %(default)s")
    args = parser.parse_args(argv)
    suite = build_suite(args.seed)
    save_suite(suite, args.out)
    print(
        f"wrote {args.out}: {len(suite.learn)} learn + {len(suite.gate)} gate + "
        f"{len(suite.holdout)} holdout cases (seed {args.seed}, gate pool "
        f"{suite.gate_pool_sha256()[:12]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
