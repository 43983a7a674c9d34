"""The signal adapter: ``[B,C,T]`` signals cut into frames -> ``[B, 1+F, D]`` tokens, CLS first.

Each frame of ``frame_size`` steps (all channels) becomes one token through a linear patch
embedding, plus a learned absolute position. Relative positions are ONE-PEACE's 1-D buckets
(``peace_core.rel_pos``), looked up in ``num_bias_tables`` tables of ``heads`` columns that the
adapter owns. Frames at or past a sample's ``frames`` count are padding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peace_core.rel_pos import gather_bucket_index, token_bucket_index, token_bucket_rows
from peace_registry.contract import AdapterOutput, BuildContext, RelativePositions
from torch import nn

from peace_template.options import SignalOptions

#: Std (cut at ±2 std) of the CLS token and the absolute positions.
EMBED_INIT_STD = 0.02


class SignalAdapter(nn.Module):
    """Signals -> tokens (see the module doc). Parameters: ``embed``, ``cls_token`` ``[1,1,D]``,
    ``pos_embed`` ``[max_frames+1, D]`` (row 0 is CLS), ``rel_pos_tables``."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        if not isinstance(ctx.options, SignalOptions):
            raise TypeError(f"signal adapter: expected SignalOptions, got {type(ctx.options)}")
        self.options = options = ctx.options
        # Build every tensor on ctx.device in ctx.dtype: the core builds on "meta" to load weights.
        factory = {"device": ctx.device, "dtype": ctx.dtype}
        self.embed = nn.Linear(options.channels * options.frame_size, ctx.dim, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, ctx.dim, **factory))
        self.pos_embed = nn.Parameter(torch.empty(options.max_frames + 1, ctx.dim, **factory))
        rows = token_bucket_rows(options.bucket_size)
        self.rel_pos_tables = nn.ModuleList(
            nn.Embedding(rows, ctx.heads, **factory) for _ in range(ctx.num_bias_tables)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Adapters initialise themselves (the core re-initialises only its own layers and FFNs);
        zero relative-position tables start every attention without a positional bias."""
        self.embed.reset_parameters()
        nn.init.zeros_(self.embed.bias)
        for param in (self.cls_token, self.pos_embed):
            bound = 2 * EMBED_INIT_STD
            nn.init.trunc_normal_(param, std=EMBED_INIT_STD, a=-bound, b=bound)
        for table in self.rel_pos_tables:
            nn.init.zeros_(table.weight)

    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in ("signal", "frames") if key not in batch]
        if missing:
            raise KeyError(f"signal batch lacks {missing} (has {sorted(batch)}): collate it first")
        signal, frames = batch["signal"], batch["frames"]
        channels, frame = self.options.channels, self.options.frame_size
        if signal.ndim != 3 or signal.shape[1] != channels or signal.shape[2] % frame:
            raise ValueError(
                f"signal batch 'signal' has shape {tuple(signal.shape)}: expected [B, {channels}, "
                f"T] with T a multiple of frame_size {frame}"
            )
        if signal.shape[2] // frame > self.options.max_frames:
            raise ValueError(
                f"signal of {signal.shape[2] // frame} frames is longer than max_frames "
                f"{self.options.max_frames}: preprocess it with this model's options"
            )
        if frames.shape != signal.shape[:1]:
            raise ValueError(f"signal batch 'frames' has shape {tuple(frames.shape)}, expected [B]")
        return signal, frames

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        signal, frames = self._inputs(batch)
        size, channels, steps = signal.shape
        count = steps // self.options.frame_size
        # [B,C,F*S] -> [B,F,C*S]: one vector per frame holding every channel.
        patches = signal.reshape(size, channels, count, -1).transpose(1, 2).flatten(2)
        patches = patches.to(self.embed.weight.dtype)  # the model's dtype, whatever the input's
        cls = self.cls_token.expand(size, -1, -1)
        tokens = torch.cat([cls, self.embed(patches)], dim=1) + self.pos_embed[: count + 1]
        positions = torch.arange(count + 1, device=tokens.device)
        padding = positions[None, :] > frames.to(tokens.device)[:, None]  # position p = frame p-1
        index = token_bucket_index(count + 1, self.options.bucket_size).to(tokens.device)
        if keep is not None:
            keep = self._checked_keep(keep, size, count + 1).to(tokens.device)
            # Gather after adding positions: kept tokens keep their original absolute and
            # relative positions. Every kept slot is real; padding is exactly where keep == -1.
            slots = keep.clamp(min=0)[..., None].expand(-1, -1, tokens.shape[-1])
            tokens = tokens.gather(1, slots).masked_fill((keep < 0)[..., None], 0.0)
            padding = keep < 0
            index = gather_bucket_index(index, keep)
        return AdapterOutput(tokens, padding, RelativePositions(index, list(self.rel_pos_tables)))

    @staticmethod
    def _checked_keep(keep: torch.Tensor, size: int, length: int) -> torch.Tensor:
        if keep.ndim != 2 or keep.shape[0] != size or keep.dtype != torch.long:
            raise ValueError(
                f"keep must be a [{size}, K] long tensor, got {keep.dtype} {keep.shape}"
            )
        if keep.numel() and not keep.is_meta:
            low, high = int(keep.min()), int(keep.max())
            if low < -1 or high >= length:
                raise ValueError(f"keep holds positions {low}..{high}, outside -1..{length - 1}")
        return keep
