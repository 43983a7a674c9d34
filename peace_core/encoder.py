"""The modality fusion encoder (spec §2): shared attention, per-modality FFNs, explicit routing.

A forward takes a sequence of :class:`Segment` (one per modality's tokens, in order), concatenates
them into one joint sequence and runs the blocks over it. Every block's attention is shared; its FFN
step applies each segment's own modality FFN to that segment's slice. Relative-position biases are
assembled block-diagonally (cross-modal blocks 0) and padded keys are masked with ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from peace_core.attention import BACKEND_NAMES, attend, resolve_backend
from peace_core.config import EncoderConfig
from peace_core.gemm import Linear
from peace_core.init import init_fusion_weights
from peace_core.layers import DropPath, LayerScale, normed_linears
from peace_registry.contract import AdapterOutput, RelativePositions, check_modality_name

#: ``(modality, length)`` of every segment of a joint sequence, in order.
Routes = tuple[tuple[str, int], ...]


@dataclass
class Segment:
    """One modality's part of a joint sequence.

    ``tokens`` ``[B,N,D]``; ``padding_mask`` ``[B,N]`` bool (True = padding); ``rel_pos`` the
    modality's relative-position bias (indices into learned tables) or None for no bias.
    """

    modality: str
    tokens: torch.Tensor
    padding_mask: torch.Tensor
    rel_pos: RelativePositions | None = None

    @classmethod
    def from_adapter(cls, modality: str, output: AdapterOutput) -> Segment:
        return cls(modality, output.tokens, output.padding_mask, output.rel_pos)


@dataclass
class FusionOutput:
    """What :class:`FusionEncoder` returns.

    ``hidden``: per segment ``[B,N,D]``, after that modality's final LayerNorm. ``padding_mask``:
    per segment ``[B,N]``. ``layer_states``: the joint sequence ``[B,T,D]`` after every block
    (before the final norms), when asked for.
    """

    hidden: list[torch.Tensor]
    padding_mask: list[torch.Tensor]
    layer_states: list[torch.Tensor] | None = None


class SharedAttention(nn.Module):
    """Multi-head self-attention shared by all modalities, with a Sub-LN before ``out_proj``.

    ``k_proj`` has no bias (a key bias shifts every score of a query equally, so it is redundant).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        eps: float = 1e-5,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SharedAttention: dim ({dim}) must be divisible by heads ({heads})")
        _check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.heads = heads
        self.backend = backend
        self.q_proj = Linear(dim, dim, bias=True, **factory)
        self.k_proj = Linear(dim, dim, bias=False, **factory)
        self.v_proj = Linear(dim, dim, bias=True, **factory)
        self.inner_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.out_proj = Linear(dim, dim, bias=True, **factory)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        norm: nn.LayerNorm | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x``, or over ``norm(x)`` when the block hands its pre-norm over (then
        neither the normalised copy nor the merged heads are kept for the backward).

        ``queries`` ``[B,Q,D]`` (rows of ``x``, same norm) attend instead of every row of ``x``:
        the output is then ``[B,Q,D]`` and ``bias`` broadcastable to ``[B,H,Q,N]``.
        """
        split_heads = "b n (h d) -> b h n d"
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if queries is None:
            q, k, v = _project(x, norm, projections)
        else:
            (q,) = _project(queries, norm, projections[:1])
            k, v = _project(x, norm, projections[1:])
        q, k, v = (rearrange(t, split_heads, h=self.heads) for t in (q, k, v))
        backend = resolve_backend(self.backend, q.device, q.dtype)
        (out,) = normed_linears(
            attend(q, k, v, bias, backend), self.inner_norm, [self.out_proj], merge_heads=True
        )
        return out

    def extra_repr(self) -> str:
        return f"heads={self.heads}, backend={self.backend!r}"


def _project(
    x: torch.Tensor, norm: nn.LayerNorm | None, linears: Sequence[nn.Linear]
) -> tuple[torch.Tensor, ...]:
    if norm is None:
        return tuple(linear(x) for linear in linears)
    return normed_linears(x, norm, linears)


@dataclass
class Rows:
    """Some rows of a joint sequence: the only ones the last block computes.

    ``index`` ``[B,Q]`` long: positions in the joint sequence, each segment's rows together and
    in segment order (``routes`` gives each segment's count); ``valid`` ``[B,Q]``: False where a
    row only pads a sample with fewer wanted rows (it reads the segment's first position and its
    output is dropped); ``lengths``: each segment's full length. Built by :meth:`from_masks`.
    """

    index: torch.Tensor
    valid: torch.Tensor
    routes: Routes
    lengths: tuple[int, ...]

    @classmethod
    def from_masks(cls, segments: Sequence[Segment], wanted: Sequence[torch.Tensor | None]) -> Rows:
        """The rows where ``wanted[i]`` (``[B,N_i]`` bool, None = every row) is True."""
        if len(wanted) != len(segments):
            raise ValueError(
                f"FusionEncoder: output_rows has {len(wanted)} entries for {len(segments)} segments"
            )
        indices, valids, routes, lengths, offset = [], [], [], [], 0
        for segment, mask in zip(segments, wanted):
            size, length = segment.padding_mask.shape
            device = segment.tokens.device
            if mask is None:
                mask = torch.ones(size, length, dtype=torch.bool, device=device)
            if mask.dtype != torch.bool or tuple(mask.shape) != (size, length):
                raise ValueError(
                    f"FusionEncoder: output_rows for segment {segment.modality!r} must be bool "
                    f"[{size},{length}], got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask.to(device)
            # Wanted positions first, in order. At least one row per segment keeps every
            # segment's FFN in the graph.
            count = max(int(mask.sum(dim=1).max()) if size else 0, 1)
            positions = torch.arange(length, device=device).expand(size, length)
            order = torch.where(mask, positions, positions + length).sort(dim=1).values[:, :count]
            valid = order < length
            indices.append(order.masked_fill(~valid, 0) + offset)
            valids.append(valid)
            routes.append((segment.modality, count))
            lengths.append(length)
            offset += length
        return cls(
            torch.cat(indices, dim=1), torch.cat(valids, dim=1), tuple(routes), tuple(lengths)
        )

    @classmethod
    def firsts(cls, segments: Sequence[Segment]) -> Rows:
        """Each segment's first position (its CLS), one row per segment."""
        size = segments[0].padding_mask.shape[0]
        lengths = tuple(segment.padding_mask.shape[1] for segment in segments)
        starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
        index = starts.to(segments[0].tokens.device).expand(size, -1)
        routes = tuple((segment.modality, 1) for segment in segments)
        return cls(index, torch.ones_like(index, dtype=torch.bool), routes, lengths)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,T,D] -> [B,Q,D]``."""
        return torch.gather(x, 1, self.index[..., None].expand(-1, -1, x.shape[-1]))

    def gather_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The selected queries' bias rows: ``[b,H,T,T] -> [B,H,Q,T]``."""
        if bias is None or bias.shape[2] == 1:  # no bias, or one row for every query
            return bias
        bias = bias.expand(self.index.shape[0], -1, -1, -1)
        index = self.index[:, None, :, None].expand(-1, bias.shape[1], -1, bias.shape[3])
        return torch.gather(bias, 2, index)

    def scatter(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each segment's ``[B,Q_i,D]`` rows to ``[B,N_i,D]``, zero at every other position."""
        counts = [count for _, count in self.routes]
        out, offset = [], 0
        pieces = zip(
            parts, self.index.split(counts, dim=1), self.valid.split(counts, dim=1), self.lengths
        )
        for part, index, valid, length in pieces:
            # Padding rows land in one extra column that is dropped.
            width = part.shape[-1]
            local = (index - offset).masked_fill(~valid, length)
            full = part.new_zeros(part.shape[0], length + 1, width)
            out.append(full.scatter(1, local[..., None].expand(-1, -1, width), part)[:, :length])
            offset += length
        return out


class FusionBlock(nn.Module):
    """Pre-LN block: shared attention, then each segment through its own modality's FFN."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffns: nn.ModuleDict,
        *,
        layer_scale_init: float | None,
        drop_path: float = 0.0,
        eps: float = 1e-5,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(ffns) == 0:
            raise ValueError("FusionBlock: ffns must hold at least one modality FFN")
        factory = {"device": device, "dtype": dtype}
        self.attn_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.attn = SharedAttention(dim, heads, eps=eps, backend=backend, **factory)
        self.attn_scale = _layer_scale(dim, layer_scale_init, **factory)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.ffns = ffns
        self.ffn_scale = _layer_scale(dim, layer_scale_init, **factory)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        routes: Routes,
        rows: Rows | None = None,
    ) -> torch.Tensor:
        """``[B,T,D] -> [B,T,D]``; with ``rows`` only those rows' outputs, ``[B,Q,D]`` (every
        row of ``x`` is still attended to)."""
        if rows is None:
            x = x + self.drop_path(self.attn_scale(self.attn(x, bias, norm=self.attn_norm)))
            return x + self.drop_path(self.ffn_scale(self._route_ffns(self.ffn_norm(x), routes)))
        queries = rows.gather(x)
        attended = self.attn(x, rows.gather_bias(bias), norm=self.attn_norm, queries=queries)
        y = queries + self.drop_path(self.attn_scale(attended))
        return y + self.drop_path(self.ffn_scale(self._route_ffns(self.ffn_norm(y), rows.routes)))

    def _route_ffns(self, h: torch.Tensor, routes: Routes) -> torch.Tensor:
        lengths = [length for _, length in routes]
        if sum(lengths) != h.shape[1]:
            raise ValueError(
                f"FusionBlock: segment lengths {lengths} sum to {sum(lengths)}, but the joint "
                f"sequence has {h.shape[1]} tokens"
            )
        parts = torch.split(h, lengths, dim=1)
        outputs = [self.ffns[modality](part) for (modality, _), part in zip(routes, parts)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class FusionEncoder(nn.Module):
    """``config.depth`` fusion blocks plus one final LayerNorm per modality.

    ``ffn_factories`` maps each modality to a zero-argument callable returning a fresh FFN module
    (``[B,N,D] -> [B,N,D]``); it is called once per block. All Linear/LayerNorm/LayerScale weights,
    FFNs included, are initialised by :func:`peace_core.init.init_fusion_weights` under
    ``config.init``.
    """

    def __init__(
        self,
        config: EncoderConfig,
        ffn_factories: Mapping[str, Callable[[], nn.Module]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not ffn_factories:
            raise ValueError("FusionEncoder: ffn_factories must name at least one modality")
        for name in ffn_factories:
            check_modality_name(name)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        # Plain floats, not torch.linspace: under ``with torch.device("meta")`` a tensor has no
        # values to read back.
        steps = max(config.depth - 1, 1)
        rates = [config.drop_path * layer / steps for layer in range(config.depth)]
        self.blocks = nn.ModuleList(
            FusionBlock(
                config.dim,
                config.heads,
                _build_ffns(ffn_factories),
                layer_scale_init=config.layer_scale_init,
                drop_path=rate,
                eps=config.norm_eps,
                backend=config.attention,
                **factory,
            )
            for rate in rates
        )
        self.final_norms = nn.ModuleDict(
            {
                name: nn.LayerNorm(config.dim, eps=config.norm_eps, **factory)
                for name in ffn_factories
            }
        )
        init_fusion_weights(self, config.init)
        if config.compile:
            for block in self.blocks:
                block.compile()  # in place: parameter names and checkpoints stay the same

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.final_norms.keys())

    def set_attention_backend(self, backend: str) -> None:
        """Use ``backend`` (any name accepted by the config) in every block from now on."""
        _check_backend_name(backend)
        for block in self.blocks:
            block.attn.backend = backend

    def forward(
        self,
        segments: Sequence[Segment],
        *,
        return_layer_states: bool = False,
        mask_padding: bool = True,
        output_rows: Sequence[torch.Tensor | None] | None = None,
        first_rows_grad_only: bool = False,
    ) -> FusionOutput:
        """Encode the joint sequence of ``segments``.

        ``mask_padding=False`` lets every query attend padded keys (the official pretraining
        decoder does this); padded input positions are zeroed before block 0 either way.

        Two ways to skip work in the last block when not every output is needed (the outputs
        that are returned are the same as without them, to float rounding):

        * ``output_rows``: per segment a ``[B,N_i]`` bool mask (None = all) of the positions
          whose hidden states are wanted; the last block computes only those, every other
          position of ``hidden`` is 0, and ``layer_states`` stops before the last block.
        * ``first_rows_grad_only``: every hidden state is computed, but only each segment's
          first position (its CLS) carries a gradient; the last block's other rows are computed
          without one, which saves their backward (for passes whose other states are targets).
        """
        self._check_segments(segments)
        if output_rows is not None and first_rows_grad_only:
            raise ValueError("FusionEncoder: give output_rows or first_rows_grad_only, not both")
        routes: Routes = tuple((s.modality, s.tokens.shape[1]) for s in segments)
        x = torch.cat([s.tokens for s in segments], dim=1)
        padding = torch.cat([s.padding_mask for s in segments], dim=1)
        x = x.masked_fill(padding.unsqueeze(-1), 0.0)
        # Skipping an all-False padding mask lets SDPA pick its fastest kernels; under compile
        # the data-dependent check is avoided (the mask is then always applied, same result).
        if mask_padding and not torch.compiler.is_compiling():
            mask_padding = bool(padding.any())

        heads = self.config.heads
        per_layer = any(s.rel_pos is not None and len(s.rel_pos.tables) > 1 for s in segments)
        shared_bias = None
        if not per_layer:
            shared_bias = build_attention_bias(segments, 0, heads=heads, mask_padding=mask_padding)

        rows = None if output_rows is None else Rows.from_masks(segments, output_rows)
        first_only = first_rows_grad_only and torch.is_grad_enabled()
        use_checkpointing = self.config.grad_checkpointing and self.training
        states: list[torch.Tensor] = []
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            bias = shared_bias
            if per_layer:
                bias = build_attention_bias(segments, layer, heads=heads, mask_padding=mask_padding)
            block_rows = rows if layer == last else None
            if layer == last and first_only:
                x = _last_block_first_rows_grad(block, x, bias, routes, segments)
            elif use_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, bias, routes, block_rows, use_reentrant=False)
            else:
                x = block(x, bias, routes, block_rows)
            if return_layer_states and (layer < last or rows is None):
                states.append(x)

        sizes = [size for _, size in (routes if rows is None else rows.routes)]
        parts = torch.split(x, sizes, dim=1)
        hidden = [self.final_norms[s.modality](part) for s, part in zip(segments, parts)]
        if rows is not None:
            hidden = rows.scatter(hidden)
        return FusionOutput(
            hidden=hidden,
            padding_mask=[s.padding_mask for s in segments],
            layer_states=states if return_layer_states else None,
        )

    def _check_segments(self, segments: Sequence[Segment]) -> None:
        if len(segments) == 0:
            raise ValueError("FusionEncoder: expected at least one segment, got none")
        batch = segments[0].tokens.shape[0]
        for i, seg in enumerate(segments):
            where = f"FusionEncoder: segment {i} ({seg.modality!r})"
            if seg.modality not in self.final_norms:
                raise KeyError(
                    f"{where}: this encoder has no FFN for that modality; it has "
                    f"{sorted(self.final_norms.keys())}"
                )
            dim = self.config.dim
            if seg.tokens.ndim != 3 or seg.tokens.shape[-1] != dim:
                raise ValueError(
                    f"{where}: tokens must be [B,N,{dim}], got {tuple(seg.tokens.shape)}"
                )
            if seg.tokens.shape[0] != batch:
                raise ValueError(
                    f"{where}: batch size {seg.tokens.shape[0]} differs from segment 0's {batch}"
                )
            mask = seg.padding_mask
            if mask.dtype != torch.bool or mask.shape != seg.tokens.shape[:2]:
                raise ValueError(
                    f"{where}: padding_mask must be bool of shape {tuple(seg.tokens.shape[:2])}, "
                    f"got {mask.dtype} of shape {tuple(mask.shape)}"
                )
            if seg.rel_pos is not None:
                count = len(seg.rel_pos.tables)
                if count not in (1, self.config.depth):
                    raise ValueError(
                        f"{where}: expected 1 shared or {self.config.depth} per-layer "
                        f"relative-position tables, got {count}"
                    )


def _last_block_first_rows_grad(
    block: FusionBlock,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    routes: Routes,
    segments: Sequence[Segment],
) -> torch.Tensor:
    """``block(x)`` whose rows carry no gradient except each segment's first (its CLS)."""
    rows = Rows.firsts(segments)
    # The no-grad pass must draw the same stochastic-depth masks as the gradient pass.
    devices = [x.device] if x.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type), torch.no_grad():
        full = block(x, bias, routes)
    first_rows = block(x, bias, routes, rows)  # [B, segments, D], with gradient
    index = rows.index[..., None].expand(-1, -1, full.shape[-1])
    return full.scatter(1, index, first_rows)


def build_attention_bias(
    segments: Sequence[Segment],
    layer: int,
    *,
    heads: int,
    mask_padding: bool = True,
) -> torch.Tensor | None:
    """The additive attention bias of a joint sequence for block ``layer``.

    Each segment's diagonal block holds its relative-position bias (table ``layer``, or table 0
    when the segment shares one table across layers); cross-modal blocks are 0. With
    ``mask_padding`` every padded key column is ``-inf``. Returns ``[B or 1, H, T, T]`` (batch 1
    when every index is ``[n,n]`` and no padding is masked), ``[B,1,1,T]`` when only padding is
    masked, or None when there is nothing to add.
    """
    padding = torch.cat([s.padding_mask for s in segments], dim=1)
    batch, total = padding.shape
    if all(s.rel_pos is None for s in segments):
        if not mask_padding:
            return None
        dtype = segments[0].tokens.dtype
        zeros = torch.zeros(batch, 1, 1, total, device=padding.device, dtype=dtype)
        return zeros.masked_fill(padding[:, None, None, :], float("-inf"))

    blocks = [_segment_bias(s, layer, heads) for s in segments]
    bias_dtype = next(b.dtype for b in blocks if b is not None)
    needs_batch = mask_padding or any(b is not None and b.shape[0] > 1 for b in blocks)
    rows_batch = batch if needs_batch else 1
    rows = []
    offset = 0
    for seg, block in zip(segments, blocks):
        length = seg.tokens.shape[1]
        if block is None:
            block = torch.zeros(1, heads, length, length, device=padding.device, dtype=bias_dtype)
        # Zero-pad the diagonal block out to a full [., H, n, T] row band.
        row = F.pad(block, (offset, total - offset - length))
        rows.append(row.expand(rows_batch, -1, -1, -1))
        offset += length
    bias = torch.cat(rows, dim=2)
    if mask_padding:
        bias = bias.masked_fill(padding[:, None, None, :], float("-inf"))
    return bias


def _segment_bias(segment: Segment, layer: int, heads: int) -> torch.Tensor | None:
    """``[1 or B, H, n, n]`` relative-position bias of one segment for ``layer`` (None if none)."""
    rel_pos = segment.rel_pos
    if rel_pos is None:
        return None
    length = segment.tokens.shape[1]
    index = rel_pos.index
    where = f"segment {segment.modality!r}"
    if index.shape[-2:] != (length, length) or index.ndim not in (2, 3):
        raise ValueError(
            f"{where}: relative-position index must be [{length},{length}] or "
            f"[B,{length},{length}], got {tuple(index.shape)}"
        )
    if index.ndim == 3 and index.shape[0] != segment.tokens.shape[0]:
        raise ValueError(
            f"{where}: relative-position index batch {index.shape[0]} differs from the tokens' "
            f"{segment.tokens.shape[0]}"
        )
    table = rel_pos.tables[layer if len(rel_pos.tables) > 1 else 0]
    if table.embedding_dim != heads:
        raise ValueError(
            f"{where}: relative-position table has {table.embedding_dim} columns, "
            f"expected one per head ({heads})"
        )
    values = table(index)  # [n,n,H] or [B,n,n,H]
    if index.ndim == 2:
        return rearrange(values, "q k h -> 1 h q k")
    return rearrange(values, "b q k h -> b h q k")


def _layer_scale(
    dim: int,
    init_value: float | None,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    if init_value is None:
        return nn.Identity()
    return LayerScale(dim, init_value, device=device, dtype=dtype)


def _build_ffns(factories: Mapping[str, Callable[[], nn.Module]]) -> nn.ModuleDict:
    ffns = {}
    for name, make in factories.items():
        ffn = make()
        if not isinstance(ffn, nn.Module):
            raise TypeError(
                f"FusionEncoder: the FFN factory for {name!r} returned {type(ffn).__name__}, "
                "expected an nn.Module"
            )
        ffns[name] = ffn
    return nn.ModuleDict(ffns)


def _check_backend_name(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKEND_NAMES}")
