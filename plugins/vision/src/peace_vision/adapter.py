"""The vision adapter (spec §1.1): hMLP patch stem, CLS, learned absolute and 2-D relative
positions.

``pixels`` ``[B,3,H,W]`` (normalised, H and W multiples of 16) become ``1 + (H/16)*(W/16)`` tokens,
CLS first, patches in row-major order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from peace_core.rel_pos import gather_bucket_index, grid_bucket_index, grid_bucket_rows
from peace_registry.contract import AdapterOutput, BuildContext, RelativePositions
from peace_vision.options import PATCH_SIZE, as_vision_options

#: Std (and truncation bound) of the CLS token and position embeddings, as in the official init.
EMBED_INIT_STD = 0.02

#: The batch key under which :meth:`VisionAdapter.precompute` leaves the embedded patches.
EMBEDDED_KEY = "embedded"


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B,C,H,W]`` map (computed channel-last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HMLPStem(nn.Module):
    """Hierarchical-MLP patch embedding: three non-overlapping convs, total stride 16.

    conv1 (k4 s4) -> LN -> GELU -> conv2 (k2 s2) -> LN -> GELU -> conv3 (k2 s2). Each 16x16
    patch is embedded independently of its neighbours.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(
                f"vision adapter: dim ({dim}) must be divisible by 4 for the hMLP stem"
            )
        factory = {"device": device, "dtype": dtype}
        inner = dim // 4
        self.conv1 = nn.Conv2d(3, inner, kernel_size=4, stride=4, **factory)
        self.norm1 = ChannelLayerNorm(inner, eps=eps, **factory)
        self.conv2 = nn.Conv2d(inner, inner, kernel_size=2, stride=2, **factory)
        self.norm2 = ChannelLayerNorm(inner, eps=eps, **factory)
        self.conv3 = nn.Conv2d(inner, dim, kernel_size=2, stride=2, **factory)
        self.act = nn.GELU()  # exact (erf) GELU, as the official stem

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(pixels)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.conv3(x)


class VisionAdapter(nn.Module):
    """Images -> ``[B, 1+h*w, D]`` tokens with 2-D relative-position buckets (see module doc).

    Parameters: ``stem.*``, ``cls_token`` ``[1,1,D]``, ``pos_embed`` ``[P*P+1, D]`` (row 0 is
    CLS; P = ``pos_bucket_size``) and ``rel_pos_tables`` (``num_bias_tables`` embeddings of
    ``(2R-1)^2 + 3`` rows by ``heads``).
    """

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        options = as_vision_options(ctx.options)
        if ctx.num_bias_tables < 1:
            raise ValueError(
                f"vision adapter: num_bias_tables must be at least 1, got {ctx.num_bias_tables}"
            )
        factory = {"device": ctx.device, "dtype": ctx.dtype}
        self.dim = ctx.dim
        self.pos_grid = options.pos_grid_size
        self.rel_bucket_size = options.rel_grid_size
        self.stem = HMLPStem(ctx.dim, eps=ctx.norm_eps, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, ctx.dim, **factory))
        self.pos_embed = nn.Parameter(torch.empty(self.pos_grid**2 + 1, ctx.dim, **factory))
        rows = grid_bucket_rows(self.rel_bucket_size)
        self.rel_pos_tables = nn.ModuleList(
            nn.Embedding(rows, ctx.heads, **factory) for _ in range(ctx.num_bias_tables)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init (spec §2.6): trunc-normal CLS/positions (cut at ±0.02), conv biases 0,
        LayerNorms (1, 0), relative-position tables 0; conv weights keep torch's default."""
        for param in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=EMBED_INIT_STD, a=-EMBED_INIT_STD, b=EMBED_INIT_STD)
        for conv in (self.stem.conv1, self.stem.conv2, self.stem.conv3):
            conv.reset_parameters()
            nn.init.zeros_(conv.bias)
        for norm in (self.stem.norm1, self.stem.norm2):
            norm.reset_parameters()
        for table in self.rel_pos_tables:
            nn.init.zeros_(table.weight)

    def position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """``[1+height*width, D]`` absolute positions for a ``height x width`` patch grid.

        The learned grid is used as is at its native size; otherwise its patch rows are resized
        bicubically in fp32 (align_corners=False) on every call, and the CLS row is kept.
        """
        if (height, width) == (self.pos_grid, self.pos_grid):
            return self.pos_embed
        cls_row, grid = self.pos_embed[:1], self.pos_embed[1:]
        grid = grid.reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(
            grid.float(), size=(height, width), mode="bicubic", align_corners=False
        )
        resized = resized.to(grid.dtype).permute(0, 2, 3, 1).reshape(height * width, -1)
        return torch.cat([cls_row, resized], dim=0)

    def _check_pixels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``batch["pixels"]``: a real ``[B,3,H,W]`` tensor with H and W positive multiples of 16,
        at most ``16 * rel_bucket_size`` pixels a side; anything else is a ``ValueError`` (a
        ``KeyError`` without the key) naming what was given.

        Values are not checked here, to keep the forward free of host-device synchronisation:
        NaN or inf pixels, or values far outside the normalised range the preprocessor produces
        (about -1.8..2.2), give non-finite tokens, which a model in eval mode refuses with a
        ``ComponentOutputError`` naming ``pixels`` (the preprocessor itself refuses such images).
        """
        if "pixels" not in batch:
            raise KeyError(
                f"vision batch has no 'pixels' (keys: {sorted(batch)}); expected the collated "
                "output of the vision preprocessor"
            )
        pixels = batch["pixels"]
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = (
                tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            )
            raise ValueError(f"vision pixels: expected a [B,3,H,W] tensor, got {shape}")
        if pixels.is_complex():  # casting would silently drop the imaginary part
            raise ValueError(f"vision pixels: expected real values, got {pixels.dtype}")
        height, width = pixels.shape[-2:]
        if height % PATCH_SIZE or width % PATCH_SIZE or height == 0 or width == 0:
            raise ValueError(
                f"vision pixels of size {height}x{width}: height and width must be positive "
                f"multiples of {PATCH_SIZE} (the patch size)"
            )
        grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
        if max(grid_h, grid_w) > self.rel_bucket_size:
            side = PATCH_SIZE * self.rel_bucket_size
            raise ValueError(
                f"vision pixels of size {height}x{width} give a {grid_h}x{grid_w} patch grid, "
                f"larger than rel_bucket_size {self.rel_bucket_size}: images may be at most "
                f"{side}x{side} pixels for this model"
            )
        return pixels

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        pixels = self._check_pixels(batch)
        tokens = batch.get(EMBEDDED_KEY)
        if tokens is None:
            tokens = self._embed(pixels)
        else:
            self._check_embedded(tokens, pixels)
        index = self._bucket_index(pixels).to(tokens.device)
        padding = torch.zeros(*tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if keep is not None:
            tokens, padding, index = _gather_kept(tokens, padding, index, keep)
        return AdapterOutput(tokens, padding, RelativePositions(index, list(self.rel_pos_tables)))

    def precompute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch plus its embedded patches (API 1.4): the stem, the adapter's only heavy
        work, then runs once (and once backward) for all the views of a pretraining step."""
        return {**batch, EMBEDDED_KEY: self._embed(self._check_pixels(batch))}

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` pixels -> ``[B, 1+h*w, D]`` CLS and patch tokens plus positions."""
        patches = self.stem(pixels.to(self.pos_embed.dtype))  # [B,D,h,w]
        size, _, grid_h, grid_w = patches.shape
        tokens = torch.cat(
            [self.cls_token.expand(size, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1
        )
        return tokens + self.position_embeddings(grid_h, grid_w)

    def _bucket_index(self, pixels: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = pixels.shape[-2] // PATCH_SIZE, pixels.shape[-1] // PATCH_SIZE
        return grid_bucket_index(grid_h, grid_w, self.rel_bucket_size)

    def _check_embedded(self, tokens: object, pixels: torch.Tensor) -> None:
        grid = (pixels.shape[-2] // PATCH_SIZE) * (pixels.shape[-1] // PATCH_SIZE)
        expected = (pixels.shape[0], 1 + grid, self.dim)
        if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != expected:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(
                f"vision batch {EMBEDDED_KEY!r} must be this adapter's precompute() output for "
                f"the batch's pixels, shape {list(expected)}; got {got}"
            )


def _gather_kept(
    tokens: torch.Tensor, padding: torch.Tensor, index: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Restrict tokens, padding and bucket indices to the positions ``keep`` ``[B,K]`` selects."""
    size, length = padding.shape
    if keep.ndim != 2 or keep.shape[0] != size or keep.dtype != torch.long:
        raise ValueError(
            f"vision keep: expected a [{size},K] long tensor, got {tuple(keep.shape)} {keep.dtype}"
        )
    if keep.numel() and (int(keep.min()) < -1 or int(keep.max()) >= length):
        raise ValueError(
            f"vision keep: positions must lie in 0..{length - 1} (or -1 for padding), got "
            f"{int(keep.min())}..{int(keep.max())}"
        )
    keep = keep.to(tokens.device)
    pad_slot = keep < 0
    safe = keep.clamp(min=0)
    kept = tokens.gather(1, safe[..., None].expand(-1, -1, tokens.shape[-1]))
    kept = kept.masked_fill(pad_slot[..., None], 0.0)
    kept_padding = padding.gather(1, safe) | pad_slot
    return kept, kept_padding, gather_bucket_index(index, safe)


def build_vision_adapter(ctx: BuildContext) -> VisionAdapter:
    """``AdapterSpec.build`` for the vision modality."""
    return VisionAdapter(ctx)
