"""The token store: examples round-trip through disk, and the data path's memory does not grow with the rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_char_tokenizer, pc_rows, write_jsonl

from lorakit.training.data import tokenize
from lorakit.training.jsonl import JsonlRows, read_jsonl
from lorakit.training.packing import PackedRows, pack
from lorakit.training.token_store import TokenStore, lengths_of, tokenize_rows

WORKER = Path(__file__).parent / "memory_worker.py"


def test_tokenized_rows_read_back_from_disk_equal_tokenizing_each_row(tmp_path):
    tok = make_char_tokenizer()
    rows = read_jsonl(write_jsonl(tmp_path / "t.jsonl", pc_rows(30)))
    store, stats = tokenize_rows(rows, tok, max_length=60, folder=tmp_path / "tokens")
    expected = [tokenize(r, tok, 60)[0] for r in rows]
    assert isinstance(rows, JsonlRows) and isinstance(store, TokenStore) and stats.total == 30
    assert [(e.input_ids, e.labels) for e in store] == [(e.input_ids, e.labels) for e in expected]
    assert lengths_of(store).tolist() == [len(e) for e in expected]
    assert (tmp_path / "tokens" / "input_ids.i32").stat().st_size == 4 * sum(len(e) for e in expected)
    assert [e.input_ids for e in store[-2:]] == [e.input_ids for e in expected[-2:]]


def test_packed_rows_are_concatenated_from_the_store_on_access(tmp_path):
    tok = make_char_tokenizer()
    store, _ = tokenize_rows(read_jsonl(write_jsonl(tmp_path / "t.jsonl", pc_rows(30))), tok, max_length=256)
    packed = pack(store, 256)
    assert isinstance(packed, PackedRows) and len(packed) < len(store)
    assert packed.lengths.tolist() == [len(r) for r in packed]
    assert sorted(n for r in packed for n in r.seq_lens) == sorted(lengths_of(store).tolist())
    assert list(pack(list(store), 256)) == list(packed)  # a list of examples packs the same way


def test_store_is_removed_with_its_temporary_folder():
    store = TokenStore()
    folder = store.folder
    store.append([1, 2], [1, 2])
    assert len(store.close()) == 1 and folder.is_dir()
    del store
    assert not folder.exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_ten_times_the_rows_add_no_memory_per_token(tmp_path):
    """Read, tokenize, pack and batch N and 10N JSONL rows (~50k and ~500k tokens) in a fresh process: 10x the rows
    adds < 8 MB of peak RSS. Control: holding the same examples as Python lists (the data path before the token
    store) adds > 24 MB (~80 bytes a token), so the measurement sees what a per-token cost would add."""
    out = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "500"], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    mb = json.loads(out.stdout.strip().splitlines()[-1])
    growth = mb["large"] - mb["small"]
    assert growth < 8, f"10x the rows ({mb['large_tokens']} tokens) added {growth:.1f} MB of peak RSS: {mb}"
    assert mb["lists"] > 24, f"control: the examples as Python lists should take > 24 MB: {mb}"
