"""Moving gradients from local leaves to their DTensor parameters, once per backward pass.

shardwise computes with each parameter's local shard, made an autograd leaf of its own
(:mod:`shardwise._engine.local_params`); autograd accumulates the gradient there, and it has to
end up in ``param.grad`` as a DTensor. Doing that in each leaf's post-accumulate-grad
hook costs more than it seems: a hook runs between large kernels, with the
interpreter's caches cold, and there every line of Python costs microseconds (about
7 us per parameter at hidden 64 and tens of microseconds at hidden 1024, against 2 us
for the same lines run in a loop). So a leaf's hook only records it, and the first
record in a backward pass queues one callback that hands the whole pass over when it
ends (``queue_callback``). ``param.grad`` is therefore complete when ``backward()``
returns, as with plain parameters, but not filled in while the pass runs.

Records are filed by graph task, so a backward pass nested in another one (reentrant
activation checkpointing) or run on another thread hands over only its own leaves. The
last task's list is cached as one ``(task, list)`` tuple, read once per record, so a
thread switch between reading the task and appending cannot file a leaf under another
thread's pass. A
pass that raises never runs its callback; the engine drops it, and its ``__del__``
hands over what had been accumulated, so ``.grad`` holds the partial gradients just as
PyTorch leaves them, and the caller's ``zero_grad()`` clears them.

Example::

    >>> local.register_post_accumulate_grad_hook(handoffs.hook(None))
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from .torch_compat import current_graph_task_id, dtensor_like, queue_engine_callback

__all__ = ["GradHandoff", "hand_off", "handoffs"]

_Entry = tuple[torch.Tensor, "ProcessGroup | None"]

#: The attribute of a local leaf that holds its DTensor parameter (set by ``local_params``).
_OWNER = "_shardwise_owner"



def hand_off(
    local: torch.Tensor, owner: nn.Parameter | None, group: ProcessGroup | None, *, reduce: bool = True
) -> None:
    """Move ``local.grad`` into ``owner.grad``, a DTensor with the owner's spec.

    With a ``group`` (a replicated weight applied to sequence shards, whose gradient
    each rank holds a partial sum of) the gradient is first all-reduced over it, unless
    ``reduce`` is false. A leaf whose gradient was already moved is skipped.

    Example::

        >>> hand_off(linear.weight._local_tensor, linear.weight, None)
    """
    grad = local.grad
    if grad is None:
        return
    local.grad = None
    if owner is None:
        return
    if group is not None and reduce:
        dist.all_reduce(grad, group=group)
    owner_grad = owner.grad
    if owner_grad is None:
        owner.grad = dtensor_like(grad, owner)  # type: ignore[arg-type]
    else:
        owner_grad._local_tensor.add_(grad)  # type: ignore[attr-defined]


def _owner(local: torch.Tensor) -> nn.Parameter | None:
    owner: nn.Parameter | None = getattr(local, _OWNER, None)
    return owner


def _hand_off_now(group: ProcessGroup | None, local: torch.Tensor) -> None:
    hand_off(local, _owner(local), group)


class _EndOfPass:
    """The callback queued for one backward pass; if the pass raises, ``__del__`` runs instead."""

    __slots__ = ("done", "handoff", "task")

    def __init__(self, handoff: GradHandoff, task: int) -> None:
        self.handoff, self.task, self.done = handoff, task, False

    def __call__(self) -> None:
        self.done = True
        self.handoff.flush(self.task)

    def __del__(self) -> None:
        if not self.done:
            # The pass raised. Its ranks may not all be here, so no collective: the
            # partial gradients are handed over as they are, for zero_grad() to clear.
            self.handoff.flush(self.task, reduce=False)


class GradHandoff:
    """The leaves whose gradients arrived in each backward pass under way, by graph task.

    Example::

        >>> hook = handoffs.hook(None)   # one per leaf
    """

    __slots__ = ("last", "pending")

    def __init__(self) -> None:
        self.pending: dict[int, list[_Entry]] = {}
        # The last task and its list, as one tuple: replaced whole, read once per record.
        self.last: tuple[int | None, list[_Entry]] = (None, [])

    def hook(
        self, group: ProcessGroup | None, *, at_once: bool = False
    ) -> Any:
        """The post-accumulate-grad hook for one leaf: a closure that only records it.

        With ``at_once`` (or without torch's graph-task id) the hook hands the gradient
        over itself, as soon as autograd has accumulated it.
        """
        task_id = current_graph_task_id
        if at_once or task_id is None:
            return functools.partial(_hand_off_now, group)

        def record(local: torch.Tensor) -> None:
            task = task_id()
            last_task, entries = self.last  # one read: a consistent pair on any thread
            if task == last_task:
                entries.append((local, group))
            elif task < 0:  # not inside the engine (no pass to wait for)
                hand_off(local, _owner(local), group)
            else:
                self._entries_of(task).append((local, group))

        return record

    def _entries_of(self, task: int) -> list[_Entry]:
        entries = self.pending.get(task)
        if entries is None:
            entries = self.pending[task] = []
            queue_engine_callback(_EndOfPass(self, task))
        self.last = (task, entries)
        return entries

    def flush(self, task: int, *, reduce: bool = True) -> None:
        """Hand over every gradient recorded in backward pass ``task``."""
        entries = self.pending.pop(task, [])
        if self.last[0] == task:
            self.last = (None, [])
        for local, group in entries:
            hand_off(local, _owner(local), group, reduce=reduce)


#: The process's hand-off queues (process state, like autograd's own queues): they hold
#: only leaves of backward passes under way; nothing in them describes a model or a mesh.
handoffs = GradHandoff()
