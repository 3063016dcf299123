"""Generate the example dataset of the main job: free-text orders -> one fixed JSON schema.

Each prompt is a short, varied English sentence describing a customer order; the completion is the same
order as canonical JSON with a fixed key order::

    {"name": "Maya Okafor", "item": "lamp", "qty": 3, "city": "Lisbon", "express": true}

Every value follows deterministically from the prompt: the name and city are copied, the item is the
singular of the product word, the quantity is a digit or a number word ("three" -> 3), and ``express`` is
true exactly when the sentence asks for fast delivery. So exact match is reachable, yet the base model
does not know the schema, which is the kind of format/structure task LoRA learns quickly.

Run from the repository root (the output is committed; the seed makes it reproducible)::

    python examples/make_json_extraction.py --out-dir examples/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Convert the order to JSON with keys name, item, qty, city, express."

FIRST = [
    "Maya", "Liam", "Olga", "Kenji", "Amara", "Diego", "Freya", "Omar", "Priya", "Lucas", "Ines", "Tariq",
    "Sofia", "Jonas", "Leila", "Mateo", "Hana", "Felix", "Zara", "Noah", "Elena", "Ravi", "Clara", "Yusuf",
    "Anna", "Hugo", "Nadia", "Oscar", "Mila", "Arjun",
]  # fmt: skip
LAST = [
    "Okafor", "Berg", "Novak", "Tanaka", "Diallo", "Ruiz", "Larsen", "Haddad", "Shah", "Moreau", "Costa",
    "Aziz", "Rossi", "Weber", "Karimi", "Silva", "Sato", "Klein", "Mensah", "Fischer", "Popescu", "Nair",
    "Dubois", "Yilmaz", "Kowalski", "Lind", "Petrov", "Garcia", "Ahmed", "Meyer",
]  # fmt: skip
ITEMS = [
    "lamp", "chair", "mug", "kettle", "notebook", "backpack", "blanket", "candle", "helmet", "jacket",
    "speaker", "pillow", "umbrella", "bottle", "toaster", "mirror", "basket", "printer", "towel", "drill",
]  # fmt: skip
CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Osaka", "Lyon", "Denver", "Krakow", "Porto", "Dublin", "Seoul", "Quito",
    "Hamburg", "Austin", "Tunis", "Zagreb", "Leeds", "Perth", "Bergen", "Malaga", "Ghent",
]  # fmt: skip
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
FAST = ["with express shipping", "as fast as possible", "by overnight delivery", "urgently"]
SLOW = ["with standard shipping", "whenever convenient", "by regular post", "with no rush"]
TEMPLATES = [
    "{name} from {city} wants {qty} {items} {speed}.",
    "Please send {qty} {items} to {name} in {city} {speed}.",
    "Order for {name}, {city}: {qty} {items}, {speed}.",
    "{name} ordered {qty} {items}, delivery to {city} {speed}.",
    "Ship {qty} {items} {speed} to {city} for {name}.",
    "New order: {qty} {items} for {name} ({city}), {speed}.",
    "Customer {name} in {city} needs {qty} {items} {speed}.",
    "Can you get {qty} {items} to {city}? It is for {name}, {speed}.",
]


def make_example(rng: random.Random) -> dict:
    """One prompt/completion pair; the completion is derived from the same sampled fields."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    item, city = rng.choice(ITEMS), rng.choice(CITIES)
    qty = rng.randint(1, 12)
    express = rng.random() < 0.5
    qty_text = WORDS[qty - 1] if rng.random() < 0.4 else str(qty)
    items = item if qty == 1 else item + "s"
    speed = rng.choice(FAST if express else SLOW)
    text = rng.choice(TEMPLATES).format(name=name, city=city, qty=qty_text, items=items, speed=speed)
    target = {"name": name, "item": item, "qty": qty, "city": city, "express": express}
    return {"prompt": f"{INSTRUCTION}\n{text}", "completion": json.dumps(target)}


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Sample distinct examples; eval prompts never appear in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        row = make_example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "data"))
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    train, evaluation = generate(a.n_train, a.n_eval, a.seed)
    write_jsonl(Path(a.out_dir) / "orders_train.jsonl", train)
    write_jsonl(Path(a.out_dir) / "orders_eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} eval examples to {a.out_dir}")


if __name__ == "__main__":
    main()
