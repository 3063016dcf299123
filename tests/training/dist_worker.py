"""One process of a multi-process training test (launched by torchrun, or by hand with the torchrun variables).

Usage: python dist_worker.py SPEC.json

SPEC holds `TrainConfig` fields plus ``die`` ({"rank": R, "step": S}: that rank SIGKILLs itself when it is about to
run step S + 1, i.e. after ``checkpoint-S`` when S is a save step). Each process writes the adapter tensors it holds
at the end (its FSDP shards under --fsdp) to ``<output_dir>/rank<R>.pt``. A `LorakitError` prints one line on
stderr and exits 1, as the CLI does.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from train_helpers import make_char_tokenizer, make_tiny_llama  # noqa: E402

import lorakit.training.loop as loop_mod  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.state import adapter_state_dict  # noqa: E402
from lorakit.training import run_training  # noqa: E402


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    die = spec.pop("die", None)
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if die is not None and die["rank"] == rank:
        real = loop_mod.Trainer._step

        def dying_step(self, stream, *args):
            if self.state.step == die["step"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, stream, *args)

        loop_mod.Trainer._step = dying_step
    model = make_tiny_llama()
    try:
        result = run_training(spec, model=model, tokenizer=make_char_tokenizer())
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 1
    local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
             for k, v in adapter_state_dict(model, "default").items()}  # fmt: skip
    torch.save(
        {"state": local, "before": result.before, "after": result.after}, Path(spec["output_dir"]) / f"rank{rank}.pt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
