"""Rank/world helpers and an all-gather that can keep gradients.

Every helper works in a plain single process too: when ``torch.distributed`` is unavailable or
not initialised there is one rank (0) of a world of one, and gathering returns the input itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def is_distributed() -> bool:
    """True when a default process group exists (``torch.distributed`` is available and set up)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default group when None); 0 outside distributed runs."""
    return dist.get_rank(group=group) if is_distributed() else 0


def world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group when None); 1 outside distributed runs."""
    return dist.get_world_size(group=group) if is_distributed() else 1


def all_gather(
    x: torch.Tensor, *, with_grad: bool, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0: ``[B, ...] -> [world·B, ...]`` (rank order).

    Every rank must pass a tensor of the same shape and dtype. ``with_grad=True`` differentiates
    through the collective: the gradient reaching this rank's ``x`` is the sum of the gradients
    every rank's graph sends to its slice. ``with_grad=False`` gathers detached copies but puts
    this rank's own ``x`` back into its slice, so the local features keep their gradient (the
    official ONE-PEACE / open_clip default). With a world of one, ``x`` is returned unchanged.
    """
    if x.dim() == 0:
        raise ValueError("all_gather: expected a tensor with a batch dimension, got a 0-d tensor")
    size = world_size(group)
    if size == 1:
        return x
    if with_grad:
        # Imported lazily: torch.distributed.nn pulls in RPC-related modules on some builds.
        from torch.distributed.nn.functional import all_gather as differentiable_all_gather

        return torch.cat(differentiable_all_gather(x, group=group), dim=0)
    local = x.contiguous()
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.detach(), group=group)
    pieces[rank(group)] = x
    return torch.cat(pieces, dim=0)
