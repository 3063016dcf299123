"""Subprocess side of the bounded-memory test: how much RSS the data path adds for N and 10N JSONL rows.

Usage: python memory_worker.py FOLDER N  (prints one JSON line: MB added per phase)

Phases, in one process, each measured from its own start (peak RSS reset through /proc/self/clear_refs):
``small`` (N rows) and ``large`` (10N rows) run what `run_training` does before the first step (read and validate
the rows, tokenize them to the token store, pack them, the length-grouped batch order, one collated batch);
``lists`` is the control: the same 10N examples held as Python lists, as the data path did before the store.
"""

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorakit.training.collate import batch_order, collate
from lorakit.training.jsonl import read_jsonl
from lorakit.training.packing import collate_packed, pack
from lorakit.training.token_store import lengths_of, tokenize_rows

WORDS = [f"w{i}" for i in range(4000)]  # ids past 256: each token of a Python list is its own int object
MAX_LENGTH = 256


def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def write_rows(path: Path, n: int) -> Path:
    rng = random.Random(n)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 180)))}) + "\n")
    return path


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured(fn) -> tuple[float, object]:
    """(MB of peak RSS above the RSS at the start, fn's result)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    start = rss_mb("VmRSS")
    out = fn()
    return rss_mb("VmHWM") - start, out


def data_path(path: Path, tok) -> tuple:
    store, _ = tokenize_rows(read_jsonl(path), tok, MAX_LENGTH)
    packed = pack(store, MAX_LENGTH)
    order = batch_order(lengths_of(store), 8, seed=0, epoch=0)
    batch = collate([store[i] for i in order[0]], pad_id=1), collate_packed(packed[:4], pad_id=1)
    return store, packed, order, batch


def main() -> None:
    folder, n = Path(sys.argv[1]), int(sys.argv[2])
    tok = tokenizer()
    data_path(write_rows(folder / "warm.jsonl", 50), tok)  # lazy imports and caches before measuring
    small_file, large_file = write_rows(folder / "small.jsonl", n), write_rows(folder / "large.jsonl", 10 * n)
    small, _ = measured(lambda: data_path(small_file, tok))
    large, kept = measured(lambda: data_path(large_file, tok))
    lists, _ = measured(lambda: [(e.input_ids, e.labels) for e in kept[0]])
    tokens = int(lengths_of(kept[0]).sum())
    print(json.dumps({"small": small, "large": large, "lists": lists, "large_tokens": tokens}))


if __name__ == "__main__":
    main()
