"""Generate the sentence-pair classification task shipped in ``examples/data/``: who did what to whom.

Each record pairs a sentence stating a two-person fact with a restatement, and asks whether the
restatement keeps the roles (``label`` 1) or swaps the two people (``label`` 0)::

    {"text": "Nadia sold a bike to Omar.", "text_pair": "Nadia sold Omar a bike.", "label": 1}
    {"text": "Nadia sold a bike to Omar.", "text_pair": "Omar sold Nadia a bike.", "label": 0}
    {"text": "Omar was beaten by Nadia at chess.", "text_pair": "Omar lost to Nadia at chess.", "label": 1}

Fourteen relations (gave, sold, lent, taught, beat, taller, older, arrived before, called, paid,
employs, mother of, visited, owes) are each phrased four or five ways: active and passive voice,
converse verbs (bought, received, lost to, works for), comparatives both ways. By default the
restatement is the same phrasing or another one that names the two roles in the same order
(``{a} beat {b}`` / ``{a} defeated {b}``; ``{b} lost to {a}`` / ``{b} was beaten by {a}``), so the
label is whether the two sentences name the people in the same order. Both labels of every
(phrasing, restatement phrasing) combination are equally frequent and hold the same words, so a bag
of words or an averaged embedding says nothing about the label: only which name stands where.

Measured on all-MiniLM-L6-v2 (1 CPU thread, batch 32, 300 steps): a frozen encoder with a linear
head trained to convergence scores 53-56% on the held-out set, full fine-tuning 100% (95% after
100 steps), LoRA r=8 on query/value with a trained head 96%.

``--flip-fraction`` mixes in restatements that name the roles in the opposite order
(``{a} sold {t} to {b}`` / ``{b} bought {t} from {a}``), where the label is the name order
*flipped*: the model must also learn which phrasings are converse. That is much harder: at 0.15,
300 steps of full fine-tuning reach 95% on the same-order records but 5% on the flipped ones (it
still answers by name order); at 0.3, 62% overall.

The held-out set uses first names that never occur in the training set (the phrasings and
objects are shared). Generation is deterministic (``--seed``).

    python examples/data/make_roles.py            # rewrites roles_train/eval.jsonl here
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    "Amara", "Bruno", "Chen", "Dalia", "Elias", "Fatima", "Goran", "Hana", "Ivan", "Jana",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tara",
    "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Anika", "Boris", "Carmen", "Diego",
    "Emma", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca", "Maya", "Nils",
    "Olga", "Pablo", "Rita", "Samir", "Tomas", "Ulla", "Victor", "Wanda", "Yara", "Zane",
]
"""First names; the last ``--eval-names`` of a seeded shuffle are kept for the held-out set."""

THINGS = ["a bike", "a book", "a lamp", "a guitar", "a map", "a ticket", "a camera", "a scarf",
          "a laptop", "a painting"]
SKILLS = ["chess", "French", "piano", "algebra", "painting", "swimming", "cooking", "Latin"]
GAMES = ["chess", "tennis", "poker", "darts", "golf", "checkers", "squash"]

# Each relation R(a, b) is a list of phrasings that all state R(a, b) about the same a and b.
# Slots: {a}, {b} = the two people; {t} = a thing, {s} = a skill, {g} = a game.
RELATIONS: dict[str, list[str]] = {
    "give": ["{a} gave {b} {t}.", "{a} gave {t} to {b}.", "{b} received {t} from {a}.",
             "{b} got {t} from {a}.", "{t} was given to {b} by {a}."],
    "sell": ["{a} sold {t} to {b}.", "{b} bought {t} from {a}.", "{t} was sold to {b} by {a}.",
             "{b} purchased {t} from {a}.", "{a} sold {b} {t}."],
    "lend": ["{a} lent {t} to {b}.", "{b} borrowed {t} from {a}.", "{a} lent {b} {t}.",
             "{t} was lent to {b} by {a}."],
    "teach": ["{a} taught {b} {s}.", "{b} learned {s} from {a}.", "{b} was taught {s} by {a}.",
              "{a} gave {b} lessons in {s}.", "{b} took {s} lessons from {a}."],
    "beat": ["{a} beat {b} at {g}.", "{b} lost to {a} at {g}.", "{a} defeated {b} at {g}.",
             "{b} was beaten by {a} at {g}.", "At {g}, {a} won against {b}."],
    "taller": ["{a} is taller than {b}.", "{b} is shorter than {a}.", "{b} is not as tall as {a}.",
               "{a} is not as short as {b}."],
    "older": ["{a} is older than {b}.", "{b} is younger than {a}.", "{a} was born before {b}.",
              "{b} was born after {a}."],
    "arrive": ["{a} arrived before {b}.", "{b} arrived after {a}.", "{b} got there later than {a}.",
               "{a} got there earlier than {b}."],
    "call": ["{a} called {b}.", "{b} was called by {a}.", "{b} got a call from {a}.", "{a} phoned {b}.",
             "{b} was phoned by {a}."],
    "pay": ["{a} paid {b}.", "{b} was paid by {a}.", "{b} received money from {a}.",
            "{a} gave money to {b}."],
    "employ": ["{a} employs {b}.", "{b} is employed by {a}.", "{b} works for {a}.",
               "{a} is the boss of {b}.", "{b}'s boss is {a}."],
    "parent": ["{a} is the mother of {b}.", "{b} is the child of {a}.", "{a} is {b}'s mother.",
               "{b}'s mother is {a}."],
    "visit": ["{a} visited {b}.", "{b} was visited by {a}.", "{b} had a visit from {a}.",
              "{a} went to see {b}."],
    "owe": ["{a} owes {b} money.", "{b} is owed money by {a}.", "{a} is in debt to {b}.",
            "{b} lent money to {a}."],
}

SAME, SWAPPED = 1, 0
"""Labels: the restatement keeps the roles (1) or swaps the two people (0)."""


def _a_first(form: str) -> bool:
    """Whether the phrasing names ``a`` (the giver, seller, winner, ...) before ``b``."""
    return form.index("{a}") < form.index("{b}")


def _combos(flipped: bool) -> list[tuple[str, int, int]]:
    """(relation, text phrasing, restatement phrasing) of two phrasings (the same one included)
    that name the two roles in the same order (``flipped`` False), or of two that name them in
    opposite orders (True)."""
    return [(rel, i, j) for rel, forms in RELATIONS.items()
            for i in range(len(forms)) for j in range(len(forms))
            if (_a_first(forms[i]) != _a_first(forms[j])) == flipped]


def _record(rng: random.Random, relation: str, i: int, j: int, label: int,
            names: list[str]) -> dict[str, str | int]:
    a, b = rng.sample(names, 2)
    slots = {"t": rng.choice(THINGS), "s": rng.choice(SKILLS), "g": rng.choice(GAMES)}
    forms = RELATIONS[relation]
    text = forms[i].format(a=a, b=b, **slots)
    pair = forms[j].format(a=a, b=b, **slots) if label == SAME else forms[j].format(a=b, b=a, **slots)
    return {"text": text[0].upper() + text[1:], "text_pair": pair[0].upper() + pair[1:], "label": label}


class _Cycle:
    """Endless draws from ``items``, each pass over them in a fresh shuffled order."""

    def __init__(self, rng: random.Random, items: list) -> None:
        self.rng, self.items, self.queue = rng, items, []

    def next(self):
        if not self.queue:
            self.queue = list(self.items)
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def _generate(rng: random.Random, n: int, names: list[str], flip_fraction: float,
              seen: set[tuple[str, str]]) -> list[dict]:
    """``n`` records; a ``flip_fraction`` of them pair phrasings that name the roles in opposite
    orders. Each kind cycles through its (relation, phrasing pair) combinations, each with both
    labels; no (text, text_pair) repeats."""
    cycles = {flipped: _Cycle(rng, [(*c, label) for c in _combos(flipped) for label in (SAME, SWAPPED)])
              for flipped in (False, True)}
    records: list[dict] = []
    while len(records) < n:
        rel, i, j, label = cycles[rng.random() < flip_fraction].next()
        record = _record(rng, rel, i, j, label, names)
        key = (record["text"], record["text_pair"])
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def make_roles(n_train: int = 2000, n_eval: int = 400, eval_names: int = 14, flip_fraction: float = 0.0,
               seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The train and held-out records, deterministic in the arguments."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be positive, got {n_train} and {n_eval}")
    if not 2 <= eval_names <= len(NAMES) - 2:
        raise ValueError(f"eval_names must be in [2, {len(NAMES) - 2}], got {eval_names}")
    if not 0.0 <= flip_fraction <= 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
    rng = random.Random(seed)
    names = list(NAMES)
    rng.shuffle(names)
    train_names, held_names = names[:-eval_names], names[-eval_names:]
    seen: set[tuple[str, str]] = set()
    train = _generate(rng, n_train, train_names, flip_fraction, seen)
    held = _generate(rng, n_eval, held_names, flip_fraction, seen)
    return train, held


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--eval-names", type=int, default=14, help="first names kept for the held-out set")
    parser.add_argument("--flip-fraction", type=float, default=0.0,
                        help="share of records whose two phrasings name the roles in opposite orders "
                             "(a harder task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    train, held = make_roles(args.n_train, args.n_eval, args.eval_names, args.flip_fraction, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out_dir / "roles_train.jsonl", train)
    _write_jsonl(args.out_dir / "roles_eval.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} held-out records to {args.out_dir}")


if __name__ == "__main__":
    main()
