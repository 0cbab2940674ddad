"""Distributed training helpers: a CPU shim for fastai's DDP path and tiny rank-aware utilities.

fastai 2.8 trains on several processes with ``learn.distrib_ctx()``, which wraps the model with
Hugging Face Accelerate and the DataLoaders with ``fastai.distributed.DistributedDL``. That path
assumes CUDA in two places:

* ``DistributedDL._broadcast`` moves the shuffled indices to ``.cuda()`` before broadcasting them
  (NCCL only moves CUDA tensors). On a CPU-only machine, even with Accelerate's ``cpu=True`` and
  the gloo backend, the first training batch fails with "Found no NVIDIA driver on your system".
* ``setup_distrib`` (used by ``distrib_ctx(in_notebook=True)``) calls ``torch.cuda.set_device``
  and hard-codes the NCCL backend.

:func:`enable_cpu_ddp` replaces both with versions that keep fastai's behaviour on NCCL and CUDA
and use CPU tensors and gloo otherwise, so the DDP path can be run with ``torchrun`` on a laptop
or in CI. It is opt-in, idempotent and undone by :func:`disable_cpu_ddp`; :func:`cpu_ddp` is the
context-manager form. It also leaves a gloo process group cleanly when the process exits, which
neither fastai nor Accelerate does.

The rank helpers (:func:`rank_and_world`, :func:`is_distributed`, :func:`broadcast_object`,
:func:`gather_objects`) read the initialised ``torch.distributed`` default group and fall back to a
single process, so code that calls them runs unchanged with or without distributed training.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "broadcast_object",
    "cpu_ddp",
    "cpu_ddp_enabled",
    "disable_cpu_ddp",
    "enable_cpu_ddp",
    "gather_objects",
    "is_distributed",
    "rank_and_world",
]

T = TypeVar("T")

# fastai's own functions, saved by enable_cpu_ddp and put back by disable_cpu_ddp.
_originals: dict[str, Callable[..., Any]] = {}
# Whether enable_cpu_ddp has registered _leave_gloo_group_at_exit with atexit (once per process).
_exit_hook_registered = False


# --- rank helpers -------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``.

    Only an initialised group counts: ``torchrun`` sets ``RANK`` and ``WORLD_SIZE`` before any
    group exists (fastai's ``rank_distrib`` reads those), but no collective can run until
    Accelerate (``learn.distrib_ctx()``, ``Accelerator()``) or ``init_process_group`` creates it.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether an initialised process group has more than one process."""
    return rank_and_world()[1] > 1


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (any picklable object); ``obj`` itself without a group.

    Every rank must call it, as with any collective. Use it for decisions that must agree across
    ranks, such as a size or a random draw made on one rank.
    """
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Return every rank's ``obj`` in rank order, on every rank; ``[obj]`` without a group.

    Every rank must call it. Objects are pickled, so floats travel exactly.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- the CPU shim -------------------------------------------------------------------------------------


def _uses_nccl(backend: str) -> bool:
    """Whether collectives of ``backend`` (e.g. ``'nccl'``, ``'gloo'``, ``'cpu:gloo,cuda:nccl'``) need CUDA tensors.

    A mixed backend still routes CUDA tensors to NCCL, so fastai's CUDA path stays valid there.
    """
    return "nccl" in backend.lower()


def _broadcast(self: Any, t: list[int], rank: int) -> list[int]:
    """``DistributedDL._broadcast`` that keeps the indices on the CPU unless the group uses NCCL."""
    if _uses_nccl(str(dist.get_backend())):
        return _originals["broadcast"](self, t, rank)
    # gloo (and MPI) broadcast CPU tensors: no CUDA context is created for three integers.
    idxs = torch.tensor(t, dtype=torch.long)
    dist.broadcast(idxs, rank)
    return idxs.tolist()


def _setup_distrib(gpu: Any = None) -> Any:
    """``setup_distrib`` that joins the group with gloo, and sets no CUDA device, when CUDA is absent."""
    if torch.cuda.is_available():
        return _originals["setup_distrib"](gpu)
    if gpu is None:
        return gpu
    from fastai.torch_core import num_distrib

    if num_distrib() > 0:
        dist.init_process_group(backend="gloo", init_method="env://")
    return int(gpu)


def _mark(fn: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """Tag ``fn`` as the shim's and point ``__wrapped__`` at fastai's ``original``."""
    fn.__wrapped__ = original  # type: ignore[attr-defined]
    fn.__fastai_tricks_cpu_ddp__ = True  # type: ignore[attr-defined]
    return fn


def _leave_gloo_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit if it is still initialised and uses gloo.

    Registered with :mod:`atexit` by :func:`enable_cpu_ddp`. Neither fastai's ``distrib_ctx`` nor
    Accelerate's ``PartialState`` ever destroys the group, so without this the group (its gloo
    worker threads and the TCP pairs to the other ranks) is left to the interpreter's own
    finalisation. That runs after the other ranks may already have closed their sockets, and gloo
    can then abort a run that has finished with ``terminate called without an active exception``
    (exit code -6). atexit runs while the interpreter is still whole, so the group is torn down in
    order here. Destroying a gloo group is local to the process, so no other rank is waited for:
    a rank that exits early, even on an exception, cannot hang here. An NCCL group is left to
    whoever created it (the shim never runs on that path), and so is a group already destroyed.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    backend = str(dist.get_backend()).lower()
    if "gloo" not in backend or _uses_nccl(backend):
        return
    with contextlib.suppress(Exception):  # exiting anyway: a failed teardown must not replace the exit code
        dist.destroy_process_group()


def cpu_ddp_enabled() -> bool:
    """Whether :func:`enable_cpu_ddp` is in effect."""
    import fastai.distributed as fd

    return getattr(fd.DistributedDL._broadcast, "__fastai_tricks_cpu_ddp__", False)


def enable_cpu_ddp() -> None:
    """Make fastai's ``learn.distrib_ctx()`` work on CPU with the gloo backend (opt-in, idempotent).

    Patches ``fastai.distributed.DistributedDL._broadcast`` (which calls ``.cuda()``) and
    ``fastai.distributed.setup_distrib`` (which calls ``torch.cuda.set_device`` and picks NCCL).
    With an NCCL process group, or when CUDA is available for ``setup_distrib``, fastai's own code
    runs, so a GPU run behaves exactly as without the shim. Call it in every process before
    ``fit``, and train with ``learn.distrib_ctx(cpu=True, sync_bn=False)``: PyTorch's
    ``SyncBatchNorm`` has no CPU kernel. Undo it with :func:`disable_cpu_ddp`.

    The first call also registers an :mod:`atexit` hook that destroys the default process group
    when the process ends, if it still exists and uses gloo. Neither fastai nor Accelerate does
    this, and gloo's teardown during interpreter finalisation can abort a finished run. The script
    below therefore needs no ``destroy_process_group()`` of its own, and calling it anyway does no
    harm.

    Example:
        Launch with ``torchrun --nproc_per_node 2 train.py``::

            from fastai_tricks.distributed import enable_cpu_ddp

            enable_cpu_ddp()
            with learn.distrib_ctx(cpu=True, sync_bn=False):
                learn.fit_one_cycle(1)

    """
    import fastai.distributed as fd

    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_leave_gloo_group_at_exit)
        _exit_hook_registered = True
    if cpu_ddp_enabled():
        return
    _originals["broadcast"] = fd.DistributedDL._broadcast
    _originals["setup_distrib"] = fd.setup_distrib
    fd.DistributedDL._broadcast = _mark(_broadcast, _originals["broadcast"])
    # distrib_ctx looks setup_distrib up in the module's globals at call time, so this reaches it.
    fd.setup_distrib = _mark(_setup_distrib, _originals["setup_distrib"])


def disable_cpu_ddp() -> None:
    """Put fastai's own ``DistributedDL._broadcast`` and ``setup_distrib`` back (no-op if not enabled)."""
    import fastai.distributed as fd

    if not cpu_ddp_enabled():
        return
    fd.DistributedDL._broadcast = _originals.pop("broadcast")
    fd.setup_distrib = _originals.pop("setup_distrib")


@contextlib.contextmanager
def cpu_ddp() -> Iterator[None]:
    """Enable the CPU shim inside a ``with`` block; leave it as it was found on exit (nesting is safe).

    Example:
        ::

            with cpu_ddp(), learn.distrib_ctx(cpu=True, sync_bn=False):
                learn.fit(1)

    """
    was_enabled = cpu_ddp_enabled()
    enable_cpu_ddp()
    try:
        yield
    finally:
        if not was_enabled:
            disable_cpu_ddp()
