"""Generate the relation-extraction task shipped in ``examples/data/``.

Each record asks the model to extract the facts a short sentence states as
``(subject | relation | object)`` triples, joined by ``"; "`` in the order the sentence mentions
them, e.g.::

    {"instruction": "Extract the (subject | relation | object) triples from the text.",
     "input": "Born in Porto, Amara Quinn moved to Oslo in 1987.",
     "output": "(Amara Quinn | born in | Porto); (Amara Quinn | lives in | Oslo)"}

Relations come from a closed set (born in, lives in, works for, studied at, married to, founded,
based in) but each is phrased several ways ("moved to", "resides in" -> lives in; "joined",
"is a nurse at" -> works for; "was founded by" -> founded, with the founder as subject), and
some sentences carry distractors (a year, a hobby) that state no triple. A base instruct model
does not produce this exact format; a LoRA adapter learns it from a few hundred examples.

The held-out set uses the same sentence templates with unseen entity combinations: every person
in it is a first-name/surname pair that never occurs in the training set, and some cities,
companies and universities occur only in it. Generation is deterministic (``--seed``).

    python examples/data/make_triples.py            # rewrites triples_train/eval.jsonl here
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Extract the (subject | relation | object) triples from the text."

FIRST_NAMES = [
    "Amara", "Bruno", "Chen", "Dalia", "Elias", "Fatima", "Goran", "Hana", "Ivan", "Jana",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tara",
    "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Anika", "Boris", "Carmen", "Diego",
]
SURNAMES = [
    "Quinn", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Silva", "Kowalski",
    "Byrne", "Petrov", "Mensah", "Ferreira", "Nakamura", "Duarte", "Holm", "Rahman", "Castillo",
    "Weber", "Ivanova", "Adeyemi", "Larsen", "Romano", "Sato", "Varga", "Keller", "Osei",
    "Dubois", "Park", "Alvarez",
]
CITIES = [
    "Porto", "Oslo", "Nairobi", "Kyoto", "Lima", "Krakow", "Montreal", "Adelaide", "Accra",
    "Seville", "Tbilisi", "Hanoi", "Bergen", "Cordoba", "Dublin", "Lyon", "Pune", "Quito",
    "Tallinn", "Zagreb", "Graz", "Busan", "Leeds", "Recife", "Malmo", "Turin", "Ghent",
    "Izmir", "Perth", "Cusco",
]
COMPANIES = [
    "Northwind Labs", "Bluepeak Foods", "Orbital Dynamics", "Greenfield Bank",
    "Silverline Motors", "Redstone Media", "Clearwater Energy", "Ironbridge Systems",
    "Lumen Robotics", "Harbor Logistics", "Cobalt Games", "Maple Pharma", "Sunrise Textiles",
    "Quantix Software", "Everest Airlines", "Pinecone Studios", "Atlas Mining", "Nimbus Cloud",
    "Vertex Optics", "Coral Biotech",
]
UNIVERSITIES = [
    "Lakeside University", "Kyoto University", "McGill University", "Delft University",
    "Uppsala University", "Makerere University", "Rice University", "Monash University",
    "Leiden University", "Tufts University", "Aalto University", "Ghent University",
]
JOBS = ["engineer", "nurse", "teacher", "chemist", "designer", "lawyer", "pilot", "chef"]
HOBBIES = ["chess", "hiking", "jazz", "painting", "sailing", "cycling", "poetry"]

# Entities reserved for the held-out set (the training set never mentions them).
HELD_OUT_CITIES = {"Tallinn", "Recife", "Ghent", "Cusco", "Busan"}
HELD_OUT_COMPANIES = {"Vertex Optics", "Coral Biotech", "Nimbus Cloud"}
HELD_OUT_UNIVERSITIES = {"Aalto University", "Rice University"}

# (sentence template, triples in order of mention). Slots: p, q = people; c, d = cities;
# o = company; u = university; y = year; job; hobby.
TEMPLATES: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("{p} was born in {c}.", [("p", "born in", "c")]),
    ("{p}, who loves {hobby}, was born in {c}.", [("p", "born in", "c")]),
    ("{p} was born in {c} and now lives in {d}.", [("p", "born in", "c"), ("p", "lives in", "d")]),
    ("Born in {c}, {p} moved to {d} in {y}.", [("p", "born in", "c"), ("p", "lives in", "d")]),
    ("{p} resides in {d}.", [("p", "lives in", "d")]),
    ("{p} works for {o}.", [("p", "works for", "o")]),
    ("{p} is a {job} at {o}.", [("p", "works for", "o")]),
    ("{p}, a {job} at {o}, lives in {d}.", [("p", "works for", "o"), ("p", "lives in", "d")]),
    ("{p} enjoys {hobby} and works for {o}.", [("p", "works for", "o")]),
    ("{p} lives in {d} and works for {o}.", [("p", "lives in", "d"), ("p", "works for", "o")]),
    ("{p} studied at {u}.", [("p", "studied at", "u")]),
    ("{p} graduated from {u} in {y}.", [("p", "studied at", "u")]),
    ("{p} is a graduate of {u}.", [("p", "studied at", "u")]),
    ("After graduating from {u}, {p} joined {o}.",
     [("p", "studied at", "u"), ("p", "works for", "o")]),
    ("{p}, who was born in {c}, studied at {u}.",
     [("p", "born in", "c"), ("p", "studied at", "u")]),
    ("{p} founded {o} in {y}.", [("p", "founded", "o")]),
    ("{o} was founded by {p}.", [("p", "founded", "o")]),
    ("{o}, founded by {p}, is based in {c}.", [("p", "founded", "o"), ("o", "based in", "c")]),
    ("{p} is the founder of {o}, a company based in {c}.",
     [("p", "founded", "o"), ("o", "based in", "c")]),
    ("{o} is based in {c}.", [("o", "based in", "c")]),
    ("{o} has its headquarters in {c}.", [("o", "based in", "c")]),
    ("{p} is married to {q}.", [("p", "married to", "q")]),
    ("{p} married {q} in {y}.", [("p", "married to", "q")]),
    ("{p}, a native of {c}, is married to {q}.", [("p", "born in", "c"), ("p", "married to", "q")]),
    ("{p} and {q}, a married couple, live in {d}.",
     [("p", "married to", "q"), ("p", "lives in", "d"), ("q", "lives in", "d")]),
]


@dataclass(frozen=True)
class _Pools:
    """The entities one split may draw from."""

    people: list[str]
    cities: list[str]
    companies: list[str]
    universities: list[str]


def _pools(rng: random.Random, eval_people: int) -> tuple[_Pools, _Pools]:
    """Train and held-out pools; held-out people are name pairs absent from training."""
    people = [f"{first} {last}" for first in FIRST_NAMES for last in SURNAMES]
    rng.shuffle(people)
    held_people, train_people = people[:eval_people], people[eval_people:]
    train = _Pools(
        people=train_people,
        cities=[c for c in CITIES if c not in HELD_OUT_CITIES],
        companies=[o for o in COMPANIES if o not in HELD_OUT_COMPANIES],
        universities=[u for u in UNIVERSITIES if u not in HELD_OUT_UNIVERSITIES],
    )
    held = _Pools(people=held_people, cities=CITIES, companies=COMPANIES,
                  universities=UNIVERSITIES)
    return train, held


def _example(rng: random.Random, template_index: int, pools: _Pools) -> dict[str, str]:
    template, triples = TEMPLATES[template_index]
    p, q = rng.sample(pools.people, 2)
    c, d = rng.sample(pools.cities, 2)
    slots = {
        "p": p, "q": q, "c": c, "d": d,
        "o": rng.choice(pools.companies),
        "u": rng.choice(pools.universities),
        "y": str(rng.randint(1960, 2022)),
        "job": rng.choice(JOBS),
        "hobby": rng.choice(HOBBIES),
    }
    sentence = template.format(**slots)
    output = "; ".join(f"({slots[s]} | {rel} | {slots[o]})" for s, rel, o in triples)
    return {"instruction": INSTRUCTION, "input": sentence, "output": output}


def _generate(rng: random.Random, n: int, pools: _Pools, seen: set[str]) -> list[dict[str, str]]:
    """``n`` examples cycling through the templates in a shuffled order, no repeated input."""
    records: list[dict[str, str]] = []
    while len(records) < n:
        order = list(range(len(TEMPLATES)))
        rng.shuffle(order)
        for index in order:
            if len(records) == n:
                break
            record = _example(rng, index, pools)
            if record["input"] in seen:
                continue
            seen.add(record["input"])
            records.append(record)
    return records


def make_triples(n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[list, list]:
    """The train and held-out records, deterministic in ``seed``."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be positive, got {n_train} and {n_eval}")
    rng = random.Random(seed)
    train_pools, held_pools = _pools(rng, eval_people=max(2, n_eval * 2))
    seen: set[str] = set()
    train = _generate(rng, n_train, train_pools, seen)
    held = _generate(rng, n_eval, held_pools, seen)
    return train, held


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    train, held = make_triples(args.n_train, args.n_eval, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out_dir / "triples_train.jsonl", train)
    _write_jsonl(args.out_dir / "triples_eval.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} held-out records to {args.out_dir}")


if __name__ == "__main__":
    main()
