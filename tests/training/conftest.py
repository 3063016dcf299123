"""Training-test fixtures; the helpers live in tests/train_helpers.py."""

from pathlib import Path

import pytest
import torch
from train_helpers import make_char_tokenizer, pc_rows, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are slower with more threads (and the CI box has 2 cores shared with other jobs)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def pc_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", pc_rows(48))
