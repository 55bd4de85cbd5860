"""Several processes, one result: the thin layer over ``torch.distributed`` that factedit's sharded work uses.

Started with ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``), statistics and evaluation
runs split their work by rank and combine it with the collectives here; started without it, nothing here
does anything and every function answers as for one process (rank 0 of 1), so single-process users see no
change. The process group is torch's own: ``gloo`` for CPU tensors, ``nccl`` when the work is on CUDA (each
rank then computes on ``cuda:LOCAL_RANK``). There is no scheduler of our own: torchrun starts, watches and
stops the processes.

What a user sees when a rank fails: the failing rank raises its own error; the others are stopped by
torchrun, or, waiting in a collective, raise a one-line :class:`FactEditError` naming the operation and
their rank (a rank that hangs without dying is detected after ``FACTEDIT_DIST_TIMEOUT`` seconds, 1,800 by
default). Everything written before (statistics caches, evaluation logs) stays valid: run again to resume.

Two rules keep the ranks in step:

* every rank calls the same collectives in the same order (the callers guarantee it: the same work list
  on every rank, decided by rank 0 where a rank's view could differ);
* inside :func:`independent` (e.g. the per-case loop of an evaluation, where ranks are at different
  cases) :func:`collective` is ``False``, so code that may shard (statistics a case needs late) runs alone
  on the rank that asks instead of waiting for ranks that will never come.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from factedit.errors import FactEditError

log = logging.getLogger(__name__)

T = TypeVar("T")
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "FACTEDIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_state = threading.local()
_owned = False  # whether this module created the process group (and so destroys it)


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets; ``None`` when they are absent.

    Malformed values are refused in one line (they come from a launcher, not from factedit)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        values = ", ".join(f"{k}={os.environ.get(k)!r}" for k in ENV_VARS)
        raise FactEditError(
            f"torchrun environment is malformed ({values}): start the processes with torchrun"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise FactEditError(
            f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return rank, world, local


def launched() -> bool:
    """Started by torchrun with more than one process."""
    env = torchrun_env()
    return env is not None and env[1] > 1


def timeout_s() -> float:
    """How long a collective waits for the other ranks before it gives up."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise FactEditError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise FactEditError(f"{TIMEOUT_ENV}={raw!r}: give a positive number of seconds")
    return value


def backend_for(device: str | torch.device | None) -> str:
    """``nccl`` for CUDA work (where NCCL is built in), ``gloo`` otherwise."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init(device: str | torch.device | None = None) -> bool:
    """Join the process group when started by torchrun (idempotent); ``False`` when there is none to join.

    Call it before the model is loaded when the work is on CUDA: it makes ``cuda`` mean ``cuda:LOCAL_RANK``
    for this process. A group created elsewhere (the user's own ``init_process_group``) is used as it is.
    """
    global _owned
    if dist.is_available() and dist.is_initialized():
        return True
    env = torchrun_env()
    if env is None or env[1] == 1:
        return False
    if not dist.is_available():
        raise FactEditError("started by torchrun, but this torch build has no torch.distributed")
    rank, world, local = env
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise FactEditError(f"rank {rank} of {world} could not join the process group ({_first_line(exc)})") from exc
    _owned = True
    atexit.register(destroy)
    log.info("rank %d of %d joined the %s process group (local rank %d)", rank, world, backend, local)
    return True


def destroy() -> None:
    """Leave the process group this module created (at exit, or earlier when a command is done)."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def active() -> bool:
    """A process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    env = torchrun_env()
    return env[2] if env is not None and active() else 0


@contextlib.contextmanager
def independent() -> Iterator[None]:
    """Ranks work on different things here: :func:`collective` is ``False`` inside (this thread)."""
    before = getattr(_state, "independent", False)
    _state.independent = True
    try:
        yield
    finally:
        _state.independent = before


def collective() -> bool:
    """Whether work should be shared between ranks now: a group exists and we are not in :func:`independent`."""
    return active() and not getattr(_state, "independent", False)


def shard(items: Sequence[T], of_rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from position ``rank`` (deterministic,
    disjoint, and together exactly ``items``)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    return list(items[r::w])


def _first_line(exc: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without the ``[file.cc:123]`` source location."""
    text = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]).split(". ")[0] if text else ""
    return line[:200] or type(exc).__name__


def _failed(what: str, exc: BaseException) -> FactEditError:
    return FactEditError(
        f"rank {rank()} of {world_size()}: {what} failed, another rank stopped or could not be reached "
        f"({_first_line(exc)}); see that rank's error, then run the same command again to resume"
    )


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:  # DistBackendError / timeouts / closed connections
        raise _failed(what, exc) from exc


def _backend_device() -> torch.device:
    """Where the group's backend takes tensors: the current GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, what: str = "summing results") -> torch.Tensor:
    """The sum over ranks of ``tensor``, in float64 whatever its dtype, on ``tensor``'s device."""
    if not active():
        return tensor.to(torch.float64)
    buffer = tensor.detach().to(device=_backend_device(), dtype=torch.float64).contiguous()
    _collective(what, lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM))
    return buffer.to(tensor.device)


def all_gather_objects(obj: Any, what: str = "exchanging results") -> list[Any]:
    """``[object of rank 0, object of rank 1, ...]`` (picklable objects)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective(what, lambda: dist.all_gather_object(out, obj))
    return out


def broadcast_object(obj: Any, src: int = 0, what: str = "sharing a decision") -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    _collective(what, lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def broadcast_tensor(tensor: torch.Tensor | None, src: int = 0, what: str = "sharing a result") -> torch.Tensor:
    """Rank ``src``'s tensor (shape and dtype included) on every rank, on the backend's device."""
    if not active():
        assert tensor is not None
        return tensor
    meta = broadcast_object((tuple(tensor.shape), tensor.dtype) if rank() == src else None, src, what)
    device = _backend_device()
    if rank() == src:
        buffer = tensor.detach().to(device).contiguous()
    else:
        buffer = torch.empty(meta[0], dtype=meta[1], device=device)
    _collective(what, lambda: dist.broadcast(buffer, src=src))
    return buffer


def barrier(what: str = "waiting for the other ranks") -> None:
    if active():
        _collective(what, dist.barrier)


def on_main(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises the same one-line
    :class:`FactEditError` when it failed there (so no rank is left waiting for a rank 0 that gave up)."""
    if not active():
        return fn()
    outcome: tuple[str, Any] | None = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except FactEditError as exc:
            outcome = ("error", str(exc))
        except BaseException as exc:  # tell the others before failing: they would wait for the timeout
            broadcast_object(("error", f"rank 0 failed while {what}: {_first_line(exc)}"), what=what)
            raise
    outcome = broadcast_object(outcome, what=what)
    if outcome[0] == "error":
        raise FactEditError(outcome[1])
    return outcome[1]


def agree(ok: bool, message: str, what: str) -> None:
    """Every rank states whether its part went well; all raise (naming the ranks) when one did not."""
    if not active():
        if not ok:
            raise FactEditError(message)
        return
    flags = all_gather_objects((ok, message if not ok else ""), what)
    failed = [(r, m) for r, (good, m) in enumerate(flags) if not good]
    if failed:
        r, m = failed[0]
        raise FactEditError(m if len(failed) == 1 else f"{m} (and {len(failed) - 1} other rank(s))")
