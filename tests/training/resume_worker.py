"""Subprocess side of the SIGKILL resume test: one tiny training run, optionally slowed down after a step.

Usage: python resume_worker.py DATA OUT [--resume] [--slow-after N]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from train_helpers import RESUME_SETTINGS, make_char_tokenizer, make_tiny_llama  # noqa: E402

import lorakit.training.loop as loop_mod  # noqa: E402
from lorakit.training import run_training  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow-after", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.slow_after is not None:
        real = loop_mod.Trainer._step

        def slow_step(self, stream, *args):
            if self.state.step >= a.slow_after:
                time.sleep(0.5)  # the parent kills the process somewhere in here
            return real(self, stream, *args)

        loop_mod.Trainer._step = slow_step
    run_training({"data": a.data, "output_dir": a.out, "resume": a.resume, **RESUME_SETTINGS},
                 model=make_tiny_llama(), tokenizer=make_char_tokenizer())  # fmt: skip


if __name__ == "__main__":
    main()
