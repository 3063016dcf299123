"""Multi-process training on ``torch.distributed``, launched by ``torchrun`` (or ``accelerate launch``).

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; `setup` turns
them into a process group (NCCL when CUDA is present, else gloo) with a timeout, so a collective whose peer died
or hangs fails instead of waiting forever. Two strategies:

* ``ddp`` (default): every rank holds the whole model; after the last micro-batch of a step the adapter
  gradients are summed across ranks in one flat ``all_reduce`` (what DistributedDataParallel does with
  ``no_sync`` during accumulation). The frozen base is never communicated: DDP's constructor would broadcast
  the whole module state, base weights included, which is why lorakit reduces the gradients itself.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer and on the root, so the frozen
  base and the adapter are sharded across ranks and FSDP reduce-scatters the adapter gradients. Saving gathers
  the full adapter (``DTensor.full_tensor``) and rank 0 writes it in PEFT format.

Data: every rank computes the same global batch order (``batch_size x world_size`` rows per micro-batch) and
takes its contiguous slice, so ``torchrun --nproc-per-node 2 ... --batch-size 2`` sees exactly the batches of one
process with ``--batch-size 4``; the loss is normalized by the global count of learned tokens.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lorakit.errors import ConfigError, LorakitError

T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp")


class DistributedError(LorakitError):
    """A collective failed: another process died, or hung past the timeout."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    timeout_s: float = 600.0
    owns_group: bool = False  # True when `setup` created the process group (and `teardown` destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    @property
    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def where(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun.") from None


def setup(strategy: str = "ddp", timeout_s: float = 600.0) -> Dist:
    """Join the process group the launcher describes (a no-op `Dist` for a plain single process).

    Raises:
        ConfigError: Unknown strategy, or a launcher environment that does not add up.
        DistributedError: The rendezvous failed (e.g. the other processes never arrived within the timeout).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed strategy {strategy!r} is unknown; expected one of {', '.join(STRATEGIES)}.")
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return Dist(strategy=strategy, timeout_s=timeout_s)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun.")
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank} of {world}: joining the process group failed ({e}).") from e
        owns = True
    return Dist(rank, world, local_rank, strategy, timeout_s, owns)


def teardown(d: Dist) -> None:
    if d.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _collective(d: Dist, what: str, fn: Callable[[], T]) -> T:
    """Run a collective; a failure (dead peer, timeout) becomes a `DistributedError` that says so."""
    try:
        return fn()
    except RuntimeError as e:
        raise lost_contact(d, what, e) from e


def lost_contact(d: Dist, what: str, e: BaseException) -> DistributedError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = text if len(text) <= 160 else text[:157] + "..."
    return DistributedError(
        f"{d.where()}: {what} failed ({first}); another process probably died or stalled past the "
        f"{d.timeout_s:.0f} s timeout (its own output says why)"
    )


def is_collective_failure(e: BaseException) -> bool:
    """Errors torch.distributed raises when a peer died or a collective timed out."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "gloo", "nccl", "socket")
    )


def all_sum(d: Dist, values: Sequence[float], what: str = "summing the step's statistics") -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not d.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=d.device)
    _collective(d, what, lambda: dist.all_reduce(t))
    return t.tolist()


def reduce_gradients(d: Dist, params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks in place, in one flat buffer (a missing grad counts as 0)."""
    if not d.enabled or not params:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault((g.dtype, g.device), []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([grads[i].reshape(-1) for i in idx])
        _collective(d, "reducing the adapter gradients", lambda flat=flat: dist.all_reduce(flat))
        offset = 0
        for i in idx:
            n = grads[i].numel()
            params[i].grad = flat[offset : offset + n].view_as(params[i]).clone()
            offset += n


@torch.no_grad()
def broadcast_params(d: Dist, params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every rank (the adapters start identical whatever the RNG did)."""
    if not d.enabled or not params:
        return
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).to(d.device, torch.float32) for p in params])
    _collective(d, "broadcasting the initial adapter", lambda: dist.broadcast(flat, src=0))
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def gather_objects(d: Dist, obj: Any, what: str = "gathering results") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world_size
    _collective(d, what, lambda: dist.all_gather_object(out, obj))
    return out


def broadcast_object(d: Dist, obj: Any, what: str = "sharing rank 0's state") -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if d.is_main else None]
    _collective(d, what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def barrier(d: Dist, what: str = "waiting for the other processes") -> None:
    if d.enabled:
        import torch.distributed as dist

        _collective(d, what, dist.barrier)


def on_main(d: Dist, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 and share its result, or raise its `LorakitError` on every rank.

    Other ranks re-raise the same error marked ``echoed_from_rank = 0`` (the CLI prints it once, from rank 0).
    """
    result: Any = None
    error: LorakitError | None = None
    if d.is_main:
        try:
            result = fn()
        except LorakitError as e:
            error = e
    result, error = broadcast_object(d, (result, error), what)
    if error is not None:
        if not d.is_main:
            error.echoed_from_rank = 0
        raise error
    return result


def shard(items: Sequence[T], d: Dist) -> tuple[list[T], int]:
    """This rank's contiguous slice of ``items`` (sizes differ by at most one) and its offset."""
    base, extra = divmod(len(items), d.world_size)
    start = d.rank * base + min(d.rank, extra)
    size = base + (1 if d.rank < extra else 0)
    return list(items[start : start + size]), start


def padded_shard(items: Sequence[T], d: Dist) -> tuple[list[T], int]:
    """Every rank gets ``ceil(len / world)`` items (the last ranks padded with ``items[0]``); returns (items, real)."""
    per = -(-len(items) // d.world_size)
    mine = list(items[d.rank * per : (d.rank + 1) * per])
    real = len(mine)
    return mine + [items[0]] * (per - real), real


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered into an ordinary tensor; other tensors unchanged. Collective."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, gathered CPU copies of ``state`` (call on every rank under FSDP)."""
    return {k: full_tensor(v.detach()).cpu().clone() for k, v in state.items()}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the classes transformers names in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def shard_model(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
