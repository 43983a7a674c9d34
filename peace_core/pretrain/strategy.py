"""How a training step is spread over processes: one process, DDP replicas, or FSDP2 shards.

``ddp`` (the default) keeps a full copy of the model, its gradients and AdamW state on every
rank and averages gradients; it is the fastest choice for models that fit one device. ``fsdp``
shards parameters, gradients and optimizer state over the ranks with FSDP2 (``fully_shard``),
one unit per fusion block, one per adapter, one for the rest of the model (projections, final
norms) and one for the objective's decoder, so a rank holds 1/world of the model between uses;
each block's unit is gathered just before it runs and freed after (the small adapter and model
units stay gathered from their forward to the end of the step's backward). On GPU the parameters
are gathered in the run's autocast dtype (bf16 compute) and gradients are reduced in fp32.
``cpu_offload`` keeps the shards and optimizer state in host memory. Activation checkpointing
per block is ``grad_checkpointing`` for both.

Scalar parameters (the contrast's ``logit_scale``) cannot be sharded: FSDP leaves them
replicated and their gradients are averaged over ranks here, as DDP does. Under FSDP every rank
must run the same modules in a step (each unit's gather is a collective); the data pipeline
guarantees it by drawing the same dataset on every rank at each step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from peace_core.config import StrictModel
from peace_core.pretrain.objective import PretrainObjective
from peace_core.pretrain.runtime import Precision, RunContext

Strategy = Literal["ddp", "fsdp"]
MicroBatchContext = contextlib.AbstractContextManager[Any]


class DistributedConfig(StrictModel):
    """How ranks share the work under torchrun (one process: no effect unless ``fsdp``)."""

    strategy: Strategy = Field(
        "ddp",
        description="ddp: full replicas, gradients averaged (models that fit one device); fsdp: "
        "parameters, gradients and optimizer state sharded over the ranks (FSDP2)",
    )
    cpu_offload: bool = Field(
        False, description="fsdp: keep parameter shards and optimizer state in host memory"
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each unit's gathered parameters after its forward (gathered "
        "again for backward); false trades memory for one gather less per unit",
    )


class TrainingStrategy:
    """One process, or DDP under torchrun: full parameters on every rank."""

    #: Whether checkpoints are written by every rank as shards (else rank 0 writes one file).
    sharded = False

    def __init__(self, context: RunContext, precision: Precision) -> None:
        self.context = context
        self.precision = precision

    @property
    def name(self) -> str:
        return "ddp" if self.context.distributed else "single process"

    def prepare(self, objective: PretrainObjective) -> None:
        """Change ``objective`` in place before its optimizer is built (FSDP shards here)."""

    def wrap(self, objective: PretrainObjective, *, find_unused_parameters: bool) -> nn.Module:
        """What a step calls: ``objective`` or a DDP wrapper of it."""
        if not self.context.distributed:
            return objective
        from torch.nn.parallel import DistributedDataParallel

        device = self.context.device
        return DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def micro_batch(self, wrapped: nn.Module, *, sync: bool) -> MicroBatchContext:
        """Around one micro-batch's forward and backward: ``sync=False`` while accumulating
        (gradients are reduced over ranks only after the last micro-batch)."""
        if sync or not self.context.distributed:
            return contextlib.nullcontext()
        return wrapped.no_sync()  # type: ignore[operator]

    def finish_gradients(self, objective: PretrainObjective) -> None:
        """After the last backward of a step, before clipping (DDP has reduced everything)."""

    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm`` (``inf``: only measure it)."""
        return float(torch.nn.utils.clip_grad_norm_(list(parameters), max_norm))

    def full_model_state(self, objective: PretrainObjective) -> dict[str, torch.Tensor]:
        """The model's full weights on CPU (a collective under FSDP: every rank calls, rank 0
        gets them, the others an empty dict)."""
        return objective.model.state_dict()

    def describe(self) -> str:
        return f"strategy: {self.name}"


class FullyShardedStrategy(TrainingStrategy):
    """FSDP2: parameters, gradients and optimizer state sharded over every rank."""

    sharded = True

    def __init__(self, context: RunContext, precision: Precision, config: DistributedConfig):
        super().__init__(context, precision)
        if config.cpu_offload and context.device.type == "cpu":
            raise ValueError(
                "distributed.cpu_offload moves a GPU run's shards to host memory; this run is "
                "on the CPU already: set it to false"
            )
        self.config = config
        self._replicated: list[nn.Parameter] = []
        self._gathered_units: list[nn.Module] = []

    @property
    def name(self) -> str:
        return "fsdp"

    def prepare(self, objective: PretrainObjective) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        mesh = init_device_mesh(self.context.device.type, (self.context.world_size,))
        # FSDP shards contiguous parameters only (a down projection's weight is stored
        # transposed for the CPU GEMMs; sharded weights run through torch's own linear anyway).
        for parameter in objective.parameters():
            if not parameter.is_contiguous():
                parameter.data = parameter.data.contiguous()
        self._replicated = [p for p in objective.parameters() if p.dim() == 0]
        options: dict[str, Any] = {
            "mesh": mesh,
            "reshard_after_forward": self.config.reshard_after_forward,
            "ignored_params": set(self._replicated),
        }
        if self.precision.autocast_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=self.precision.autocast_dtype, reduce_dtype=torch.float32
            )
        if self.config.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        model = objective.model
        for block in model.encoder.blocks:
            fully_shard(block, **options)
        # Adapters and the model return dataclasses, which FSDP cannot look into to gather their
        # parameters again for backward, and an adapter's output refers to its relative-position
        # tables, read by the blocks after it has run: these units stay gathered from their
        # forward to their backward. They are small; the blocks hold the bulk.
        kept = {**options, "reshard_after_forward": False}
        for adapter in model.adapters.values():
            fully_shard(adapter, **kept)
            if callable(getattr(adapter, "precompute", None)):
                # A method other than forward must gather the unit's parameters too.
                register_fsdp_forward_method(adapter, "precompute")
        # The model is a unit of its own (projections, final norms), so that it can be called
        # directly, e.g. to embed with the live model; the root keeps the decoder.
        fully_shard(model, **kept)
        # A precomputed tensor in a view's batch is an input that takes gradients, so FSDP runs
        # the post-backward of the units it passes through (the adapter, the model) as soon as
        # that view's backward reaches it, while other views and precompute's own backward (a
        # conv stem's weights) still need their parameters. These small units therefore stay
        # gathered after the backward too; their gradients are reduced as they come (FSDP adds
        # the partial reductions up), and finish_gradients reshards them before the optimizer
        # updates the shards (so the next step gathers the new weights).
        self._gathered_units = [*model.adapters.values(), model]
        for unit in self._gathered_units:
            unit.set_reshard_after_backward(False, recurse=False)
        fully_shard(objective, **options)

    def wrap(self, objective: PretrainObjective, *, find_unused_parameters: bool) -> nn.Module:
        return objective

    def micro_batch(self, wrapped: nn.Module, *, sync: bool) -> MicroBatchContext:
        return _gradient_sync(wrapped, sync)

    def finish_gradients(self, objective: PretrainObjective) -> None:
        for unit in self._gathered_units:
            unit.reshard()
        world = self.context.world_size
        for parameter in self._replicated:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad.div_(world)

    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float) -> float:
        """The norm over every rank's shards plus the replicated scalars, counted once."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
        replicated = [g for g in grads if not isinstance(g, DTensor)]
        device = self.context.device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        for g in sharded:
            squares += g.detach().float().pow(2).sum().to(device)
        dist.all_reduce(squares)
        for g in replicated:
            squares += g.detach().float().pow(2).sum().to(device)
        norm = float(squares.sqrt())
        if math.isfinite(max_norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        return norm

    def full_model_state(self, objective: PretrainObjective) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(objective, options=options)
        return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}

    def describe(self) -> str:
        extras = []
        if self.config.cpu_offload:
            extras.append("cpu offload")
        if self.precision.autocast_dtype is not None:
            extras.append(f"{self.precision.name} gathers, fp32 reduce")
        shown = ", ".join(extras)
        return f"strategy: fsdp over {self.context.world_size} rank(s)" + (
            f" ({shown})" if shown else ""
        )


@contextlib.contextmanager
def _gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    if sync:
        yield
        return
    module.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[operator]


def build_strategy(
    config: DistributedConfig, context: RunContext, precision: Precision
) -> TrainingStrategy:
    """The strategy ``config`` names (validated with the rest of :class:`PretrainConfig`)."""
    if config.strategy == "fsdp":
        return FullyShardedStrategy(context, precision, config)
    return TrainingStrategy(context, precision)
