"""The imu adapter: ``[B,T,6]`` windows cut into patches -> ``[B, 1+P, D]`` tokens, CLS first.

Each patch of ``patch_size`` consecutive samples (all six channels) becomes one token through a
linear projection, plus a learned absolute position. Relative positions are ONE-PEACE's 1-D
buckets (``peace_core.rel_pos``), looked up in ``num_bias_tables`` tables of ``heads`` columns
that the adapter owns. Patches at or past a window's ``lengths`` are padding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peace_core.rel_pos import gather_bucket_index, token_bucket_index, token_bucket_rows
from peace_registry.contract import AdapterOutput, BuildContext, RelativePositions
from torch import nn

from peace_imu.options import CHANNELS, ImuOptions

#: Std (cut at ±2 std) of the CLS token and the absolute positions.
EMBED_INIT_STD = 0.02


class ImuAdapter(nn.Module):
    """Windows -> tokens (see the module doc). Parameters: ``embed`` (``patch_size * 6`` ->
    ``dim``), ``cls_token`` ``[1,1,D]``, ``pos_embed`` ``[max_patches+1, D]`` (row 0 is CLS),
    ``rel_pos_tables``."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        if not isinstance(ctx.options, ImuOptions):
            raise TypeError(f"imu adapter: expected ImuOptions, got {type(ctx.options)}")
        self.options = options = ctx.options
        # Build every tensor on ctx.device in ctx.dtype: the core builds on "meta" to load weights.
        factory = {"device": ctx.device, "dtype": ctx.dtype}
        self.embed = nn.Linear(options.patch_size * len(CHANNELS), ctx.dim, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, ctx.dim, **factory))
        self.pos_embed = nn.Parameter(torch.empty(options.max_patches + 1, ctx.dim, **factory))
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
        missing = [key for key in ("imu", "lengths") if key not in batch]
        if missing:
            raise KeyError(f"imu batch lacks {missing} (has {sorted(batch)}): collate it first")
        imu, lengths = batch["imu"], batch["lengths"]
        patch = self.options.patch_size
        if imu.ndim != 3 or imu.shape[2] != len(CHANNELS) or imu.shape[1] % patch:
            raise ValueError(
                f"imu batch 'imu' has shape {tuple(imu.shape)}: expected [B, T, {len(CHANNELS)}] "
                f"with T a multiple of patch_size {patch}"
            )
        if imu.shape[1] // patch > self.options.max_patches:
            raise ValueError(
                f"imu window of {imu.shape[1] // patch} patches is longer than max_patches "
                f"{self.options.max_patches}: preprocess it with this model's options"
            )
        if lengths.shape != imu.shape[:1]:
            raise ValueError(f"imu batch 'lengths' has shape {tuple(lengths.shape)}, expected [B]")
        return imu, lengths

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        imu, lengths = self._inputs(batch)
        size, steps, _ = imu.shape
        patch = self.options.patch_size
        count = steps // patch
        # [B,P*S,6] -> [B,P,S*6]: one vector per patch, its samples in time order.
        patches = imu.reshape(size, count, -1).to(self.embed.weight.dtype)  # the model's dtype
        cls = self.cls_token.expand(size, -1, -1)
        tokens = torch.cat([cls, self.embed(patches)], dim=1) + self.pos_embed[: count + 1]
        filled = torch.div(lengths.to(tokens.device) + patch - 1, patch, rounding_mode="floor")
        positions = torch.arange(count + 1, device=tokens.device)
        padding = positions[None, :] > filled[:, None]  # position p holds patch p-1
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
                f"keep must be a [{size}, K] long tensor, got {keep.dtype} {tuple(keep.shape)}"
            )
        if keep.numel() and not keep.is_meta:
            low, high = int(keep.min()), int(keep.max())
            if low < -1 or high >= length:
                raise ValueError(f"keep holds positions {low}..{high}, outside -1..{length - 1}")
        return keep
