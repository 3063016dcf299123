"""Training-test fixtures; the helpers live in train_helpers.py next to this file."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import make_char_tokenizer, pc_rows, write_jsonl  # noqa: E402


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
