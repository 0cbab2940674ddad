"""Count device-to-host synchronisations on any device, the CPU included.

A sync makes the host wait until the device has caught up, so one per batch costs throughput on every step of a
GPU fit. CUDA can report them (``torch.cuda.set_sync_debug_mode``), but only on a GPU. On the CPU they can still be
counted: a ``TorchDispatchMode`` sees every aten op, among them those that must read a device value on the host
(``_local_scalar_dense`` behind ``.item()``, ``bool()`` and ``int()``; ``nonzero``; ``masked_select``;
``torch.equal``; indexing with a boolean mask). Copies between host and device reach no aten op on the CPU, so ``Tensor.cpu``,
``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.to`` with a device are wrapped and counted too.

The package's tests (``tests/test_host_syncs.py``) and ``benchmarks/device_check.py`` use this to show that no
callback adds a sync per batch; it works on your own callbacks the same way::

    with counting_host_syncs() as counter:
        learn.fit(1)
    print(counter.counts)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "counting_host_syncs"]

_aten = torch.ops.aten
# Ops that read a device value on the host, whatever their arguments.
_READS_DEVICE = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.is_nonzero.default,
    _aten.equal.default,  # torch.equal returns a Python bool
}
# Ops that sync when one of their index tensors is a boolean mask (its count of True decides the shape).
_MASK_INDEXED = {_aten.index, _aten.index_put, _aten.index_put_}
_HOST_COPIES = ("cpu", "tolist", "numpy", "to")


def _has_mask(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
    )


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call moves memory to a device, as opposed to a dtype-only cast."""
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)


class HostSyncCounter(TorchDispatchMode):
    """Count, while :attr:`active`, the ops and tensor methods that synchronise the host with the device.

    Use it through :func:`counting_host_syncs`, which also counts the host copies. ``counts`` maps what synced
    (an aten op's name, ``'boolean indexing'`` or ``'Tensor.cpu'`` and the like) to how often.

    Args:
        active: Count from the start; set :attr:`active` later to count only a window (a batch, say).
    """

    def __init__(self, active: bool = True) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.active = active

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105 - the dispatch hook
        kwargs = kwargs or {}
        if self.active:
            if func in _READS_DEVICE:
                self.counts[str(func.overloadpacket.__name__)] += 1
            elif func.overloadpacket in _MASK_INDEXED and _has_mask(args[1] if len(args) > 1 else None):
                self.counts["boolean indexing"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """All syncs counted so far."""
        return sum(self.counts.values())


@contextmanager
def counting_host_syncs(counter: HostSyncCounter | None = None) -> Iterator[HostSyncCounter]:
    """Count the host syncs made inside the block: the dispatch mode plus the wrapped host-copy methods.

    Args:
        counter: The counter to fill (a new one, active from the start, if None).

    Returns:
        A context manager that yields the counter.
    """
    counter = counter if counter is not None else HostSyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_COPIES}

    def wrap(name: str) -> Callable:
        original = originals[name]

        def counted(self, *args, **kwargs):
            if counter.active and (name != "to" or _names_a_device(args, kwargs)):
                counter.counts[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)

        return counted

    try:
        for name in originals:
            setattr(torch.Tensor, name, wrap(name))
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
