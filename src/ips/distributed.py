"""Data-parallel training over several processes (torchrun and DistributedDataParallel).

``torchrun --nproc-per-node K -m ips train ...`` starts K processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; ``init_distributed`` joins them into one process group
(NCCL on CUDA, gloo on the CPU). Letters: B the global batch (``train.batch_size``), W the
number of processes, A the micro-steps per optimizer step (``train.accumulate``).

One optimizer step always sees the B images one process would load, in the same seeded order:
each global batch is split into W parts (one per process) and each part into A micro-batches
of B / (W A) images (``TrainBatchSampler``). Evaluation deals whole batches to the processes in
turn (``EvalBatchSampler``) and gathers the results, so its metrics equal one process's.

This module needs only torch.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from ips.errors import PREEMPTED_EXIT, InputError

DEFAULT_TIMEOUT = timedelta(minutes=30)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the process group."""

    rank: int = 0  # this process, 0 .. W - 1
    world_size: int = 1  # W: processes in the group
    local_rank: int = 0  # this process on its machine (its GPU index)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and the config; the others only train."""
        return self.rank == 0


def current() -> Ranks:
    """This process's place in the initialised process group (rank 0 of 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    local = from_environment().local_rank
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def from_environment() -> Ranks:
    """This process's place as torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` say,
    without a process group (rank 0 of 1 without them)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise InputError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    return Ranks(rank=rank, world_size=world, local_rank=local)


def launched() -> bool:
    """True in a process that torchrun (or ``ips train --nproc``) started as one of several."""
    return from_environment().world_size > 1


def init_distributed(
    device: torch.device | str, *, timeout: timedelta = DEFAULT_TIMEOUT
) -> torch.device:
    """Join the process group that torchrun's environment variables describe.

    Args:
        device: the device type to train on; on CUDA each process takes cuda:LOCAL_RANK.
        timeout: how long a collective operation (and joining the group) may wait before it
            fails instead of hanging, e.g. when another process died.

    Returns:
        This process's device.
    """
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed training needs torchrun's environment variables; {', '.join(missing)} "
            "not set (start with torchrun or ips train --nproc K)"
        )
    device = torch.device(device)
    local_rank = from_environment().local_rank
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise InputError(
                f"process with LOCAL_RANK {local_rank} needs a CUDA device of that index, this "
                f"machine has {count}: start at most {count} processes per machine"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def shutdown() -> None:
    """Leave the process group (if there is one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the model ------------------------------------------------------------------------------


def wrap(model: nn.Module) -> DistributedDataParallel:
    """DistributedDataParallel around ``model``: gradients are averaged over the processes
    during backward, and (DDP's default) rank 0's buffers, the BatchNorm statistics, are
    copied to every process at the start of each forward, so every process selects patches
    with the same model.

    No ``device_ids``: DDP would then copy every input tensor to the GPU before the forward,
    including a whole batch of patches that lazy loading keeps on the host.
    """
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


# ---- collectives on plain data -------------------------------------------------------------


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (anything picklable), in rank order; ``[obj]`` without a group."""
    if current().world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the processes."""
    if current().world_size == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else None
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def barrier() -> None:
    """Wait until every process gets here (no-op without a group)."""
    if current().world_size > 1:
        dist.barrier()


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


# ---- which process loads which images -------------------------------------------------------


def micro_batch_size(batch_size: int, world_size: int, accumulate: int) -> int:
    """B / (W A): images per process and micro-step; B must split evenly."""
    if batch_size % (world_size * accumulate):
        raise InputError(
            f"train.batch_size (B={batch_size}) is the batch of one optimizer step over all "
            f"processes and must split evenly into {world_size} processes x "
            f"train.accumulate={accumulate} micro-steps"
        )
    return batch_size // (world_size * accumulate)


def split_evenly(num_items: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``num_items``: they differ by at most one, the
    larger ones first."""
    return [num_items // parts + (i < num_items % parts) for i in range(parts)]


class TrainBatchSampler(Sampler[list[int]]):
    """This process's micro-batches for one epoch of training.

    The global batches are those one process loads with a shuffled DataLoader of batch size B
    (the same seeded order; the last batch may be shorter). Each is cut into W A contiguous
    pieces of near-equal size: process r gets pieces r A .. r A + A - 1, one per micro-step. A
    piece that gets no image (a last batch shorter than W A) holds a stand-in, the first image
    of its batch, that counts for nothing (``shares``): its forward and backward only keep the
    processes in step.

    Args:
        num_items: images in the dataset.
        batch_size: B, images per optimizer step over all processes.
        seed: seed of the shuffle (one per epoch).
        shuffle: False: the batches in dataset order.
        rank: this process.
        world_size: W.
        accumulate: A, micro-steps per optimizer step.
        weights: per image, how likely it is drawn: the epoch then draws ``num_items`` images
            with replacement (seeded), instead of a permutation (e.g. inverse class
            frequencies, `balanced_weights`).
        start_step: leave out the first this many global batches (an epoch resumed after
            that many optimizer steps).

    Attributes:
        batches: the micro-batches, A per optimizer step.
        shares: per micro-batch, (images that count, images in its global batch).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
        weights: Sequence[float] | None = None,
        start_step: int = 0,
    ):
        micro_batch_size(batch_size, world_size, accumulate)
        parts = world_size * accumulate
        if not 0 <= rank < world_size:
            raise InputError(f"rank must be in [0, {world_size}), got {rank}")
        self.accumulate = accumulate
        self.world_size = world_size
        generator = torch.Generator().manual_seed(seed)
        if weights is not None:
            if len(weights) != num_items:
                raise InputError(f"weights: one per image ({num_items}), got {len(weights)}")
            drawn = torch.multinomial(
                torch.as_tensor(weights, dtype=torch.float64), num_items, True, generator=generator
            ).tolist()
            order: Any = [drawn[i : i + batch_size] for i in range(0, num_items, batch_size)]
        else:  # the index batches of a plain shuffled DataLoader: one process's order unchanged
            order = DataLoader(
                range(num_items),
                batch_size=batch_size,
                shuffle=shuffle,
                generator=generator,
                collate_fn=list,
            )
        self.batches: list[list[int]] = []
        self.shares: list[tuple[int, int]] = []
        for batch in order:
            sizes = split_evenly(len(batch), parts)
            starts = [sum(sizes[:i]) for i in range(parts)]
            for piece in range(rank * accumulate, (rank + 1) * accumulate):
                ids = batch[starts[piece] : starts[piece] + sizes[piece]]
                self.batches.append(ids or batch[:1])
                self.shares.append((len(ids), len(batch)))
        if not 0 <= start_step <= len(self.batches) // accumulate:
            raise InputError(
                f"start_step must be in [0, {len(self.batches) // accumulate}], got {start_step}"
            )
        self.start_step = start_step
        del self.batches[: start_step * accumulate], self.shares[: start_step * accumulate]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def balanced_weights(classes: Sequence[int]) -> list[float]:
    """Per image, the inverse frequency of its class (``classes``: one per image, -1 where
    unknown), scaled so that every class present is drawn equally often and the images of
    unknown class as often as without balancing."""
    known = [c for c in classes if c >= 0]
    if not known:
        raise InputError("data.balance: no image of the training set has a known label")
    counts: dict[int, int] = {}
    for c in known:
        counts[c] = counts.get(c, 0) + 1
    share = len(known) / len(counts)  # images per class if the classes were balanced
    return [share / counts[c] if c >= 0 else 1.0 for c in classes]


class EvalBatchSampler(Sampler[list[int]]):
    """Batches of B consecutive images, as one process evaluates them, dealt to the processes
    in turn: process r gets batches r, r + W, r + 2W, ... (``batch_ids`` holds their numbers).

    Args:
        num_items: images in the dataset.
        batch_size: B.
        rank: this process.
        world_size: W.
    """

    def __init__(self, num_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise InputError(f"rank must be in [0, {world_size}), got {rank}")
        starts = range(0, num_items, batch_size)
        self.batch_ids = list(range(rank, len(starts), world_size))
        self.world_size = world_size
        self.batches = [
            list(range(starts[k], min(starts[k] + batch_size, num_items))) for k in self.batch_ids
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ---- launching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessError:
    """One launched process that failed."""

    rank: int
    exit_code: int
    line: str  # "process R of K failed with exit status S: its error"


def launch(argv: Sequence[str], *, nproc: int) -> list[ProcessError]:
    """Run ``python -m ips ARGV`` in ``nproc`` processes on this machine through PyTorch's
    elastic launcher, as ``torchrun --standalone --nproc-per-node NPROC -m ips ARGV`` does.

    Returns:
        The processes that failed (none when all succeeded), the first to fail first: when
        one fails the launcher stops the others, whose errors may echo the first one's.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "ips", *argv]
    )
    try:
        run(args)
    except ChildFailedError as err:  # the launcher stopped the other processes
        return _process_errors(err, nproc)
    except SignalException as err:  # the launcher got the signal and passed it on to them
        name = signal.Signals(err.sigval).name
        line = (
            f"stopped by {name}: the processes were asked to save their step; the same command "
            "with --resume continues from the last checkpoint"
        )
        return [ProcessError(-1, PREEMPTED_EXIT, line)]
    return []


def _process_errors(err: Any, nproc: int) -> list[ProcessError]:
    """The failures a ChildFailedError reports, in the order they happened."""
    failures = sorted(err.failures.items(), key=lambda item: (_failed_at(item[1]), item[0]))
    out = []
    for rank, failure in failures:
        reason = failure.message  # the process's error (from its error file) or signal
        if isinstance(reason, dict):
            reason = reason.get("message", "")
        known = failure.error_file != "<N/A>" or failure.exitcode < 0
        reason = " ".join(str(reason).split()) if known else ""
        line = f"process {rank} of {nproc} failed with exit status {failure.exitcode}"
        out.append(ProcessError(rank, failure.exitcode, line + (f": {reason}" if reason else "")))
    return out


def _failed_at(failure: Any) -> float:
    """When a launched process failed: its error file's time, else the launcher's record."""
    path = Path(failure.error_file)
    return path.stat().st_mtime if path.is_file() else float(failure.timestamp)
