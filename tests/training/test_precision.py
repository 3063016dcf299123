import os

import torch

from lorakit.training import precision
from lorakit.training.precision import busy_cores, choose_threads, make_autocast


def test_requested_threads_win(monkeypatch):
    monkeypatch.setattr(precision, "busy_cores", lambda: 99.0)
    assert choose_threads(2) == 2 and torch.get_num_threads() == 2


def test_threads_shrink_to_the_free_cores_but_never_below_one(monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(precision, "busy_cores", lambda: 0.1)
    assert choose_threads(None) == 2
    monkeypatch.setattr(precision, "busy_cores", lambda: 1.2)
    assert choose_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(precision, "busy_cores", lambda: 5.0)
    assert choose_threads(None) == 1


def test_busy_cores_is_a_fraction_of_the_machine():
    b = busy_cores(0.05)
    assert b is None or 0 <= b <= (os.cpu_count() or 1) + 1e-6


def test_fp32_precision_means_no_autocast():
    with make_autocast("fp32", torch.device("cpu"))():
        assert not torch.is_autocast_enabled("cpu")
    with make_autocast("bf16", torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu")
