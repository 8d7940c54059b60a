"""Deterministic synthetic data for the shipped jobs, and content hashes of data files.

`negation-sentiment`: short reviews whose label is the adjective's polarity flipped by a
negation ("the battery was not reliable" is negative, "the staff was hardly rude" is
positive). The label is polarity XOR negation, which a linear probe on frozen sentence
embeddings cannot separate well (the embedding of "not good" stays close to "good"),
while a LoRA adapter on the attention learns it in about one epoch. A classifier with
no training, or trained with a learning rate that barely moves it, stays near chance.

`negation-verdict`: the same reviews as prompts for a causal LM, answered with one
word ("Verdict: good" / "Verdict: bad"): the base model does not answer in this
format, so an untrained adapter scores near zero exact matches.

Every generator is a pure function of (seed, rows): the same spec always yields the
same bytes, so the buyer can commit to its held-out file by sha256 at post time.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Iterator

SUBJECTS = (
    "the food", "the service", "the room", "the staff", "the movie", "the battery", "the screen", "the hotel",
    "the driver", "the coffee", "the concert", "the app", "the camera", "the checkout", "the delivery",
    "the soup", "the seats", "the keyboard", "the manual", "the tour", "the pizza", "the support team",
    "the update", "the view", "the music", "the ending", "the price", "the laptop", "the trip", "the lesson",
)
POSITIVE = (
    "good", "great", "excellent", "friendly", "clean", "reliable", "fast", "pleasant", "helpful", "tasty",
    "comfortable", "amazing", "wonderful", "solid", "fantastic", "lovely", "impressive", "fresh", "smooth",
    "polite", "worth it", "enjoyable", "brilliant", "satisfying", "decent",
)
NEGATIVE = (
    "bad", "terrible", "awful", "rude", "dirty", "unreliable", "slow", "unpleasant", "useless", "bland",
    "uncomfortable", "horrible", "disappointing", "flimsy", "broken", "noisy", "boring", "stale", "clumsy",
    "overpriced", "annoying", "mediocre", "poor", "confusing", "cold",
)
VERBS = ("was", "is", "seemed", "felt", "looked")
NEGATIONS = ("not", "never", "hardly", "far from", "anything but", "not at all", "by no means")
OPENERS = ("", "honestly, ", "to be fair, ", "overall ", "i think ", "frankly, ", "in my view ", "sadly, ",
           "luckily, ", "as expected ")
CLOSERS = ("", ".", "!", " this time.", " for the price.", " if you ask me.", " again.")
VERDICTS = ("bad", "good")


def _review(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    verb = rng.choice(VERBS)
    middle = f"{verb} {rng.choice(NEGATIONS)} {adjective}" if negated else f"{verb} {adjective}"
    text = f"{rng.choice(OPENERS)}{rng.choice(SUBJECTS)} {middle}{rng.choice(CLOSERS)}"
    return text, int(positive != negated)


def negation_sentiment(seed: int, rows: int) -> Iterator[dict]:
    """{"text", "label"} rows; label 1 (positive) iff the adjective's polarity survives the negation."""
    rng = random.Random(seed)
    for _ in range(rows):
        text, label = _review(rng)
        yield {"text": text, "label": label}


def negation_verdict(seed: int, rows: int) -> Iterator[dict]:
    """{"prompt", "completion"} rows for a causal LM: the review, then a one-word verdict."""
    rng = random.Random(seed)
    for _ in range(rows):
        text, label = _review(rng)
        yield {"prompt": f"Review: {text}\nVerdict:", "completion": f" {VERDICTS[label]}"}


GENERATORS: dict[str, Callable[[int, int], Iterator[dict]]] = {
    "negation-sentiment": negation_sentiment,
    "negation-verdict": negation_verdict,
}


def write_jsonl(path: Path, rows: Iterator[dict]) -> int:
    """Write rows as JSON lines (atomically); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
            count += 1
    tmp.replace(path)
    return count


def generate(generator: str, path: Path, *, seed: int, rows: int) -> int:
    if generator not in GENERATORS:
        raise ValueError(f"unknown data generator {generator!r}; known: {', '.join(sorted(GENERATORS))}")
    return write_jsonl(path, GENERATORS[generator](seed, rows))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_rows(path: Path) -> int:
    with Path(path).open("rb") as handle:
        return sum(1 for line in handle if line.strip())
