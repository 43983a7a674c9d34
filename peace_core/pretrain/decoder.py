"""The light pretraining decoder of the denoising contrast (spec §3.1, §3.3 step 3).

The student encoder sees only the kept positions of a sequence. The decoder puts its outputs back
where they came from, fills every other position with a learned per-modality mask token, adds
learned absolute positions (indexed by the ORIGINAL position, CLS = 0), runs a small fusion
encoder (shared attention, per-modality FFNs, no LayerScale, no relative positions) over one or
more modalities jointly, and maps back to the encoder width with a per-modality head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import nn

from peace_core.config import AttentionBackendName, EncoderConfig, InitSchemeName, StrictModel
from peace_core.encoder import FusionEncoder, Segment
from peace_core.gemm import Linear
from peace_core.init import LINEAR_INIT_STD, init_fusion_weights
from peace_core.layers import GeGLUFFN
from peace_registry.contract import check_modality_name

#: The official decoder (spec §3.1): 768 wide, 12 heads, FFN 2048, 2 layers.
OFFICIAL_DECODER_DIM = 768
OFFICIAL_DECODER_HEAD_DIM = 64


class DecoderConfig(StrictModel):
    """Sizes of :class:`PretrainDecoder`; defaults are the official 4B model's decoder."""

    dim: int = Field(OFFICIAL_DECODER_DIM, gt=0, description="decoder width D_dec")
    depth: int = Field(2, gt=0, description="decoder fusion blocks")
    heads: int = Field(12, gt=0, description="attention heads; must divide dim")
    ffn_dim: int = Field(2048, gt=0, description="inner size of the decoder's modality FFNs")
    max_positions: int = Field(
        1026, gt=0, description="rows of each modality's absolute-position table (CLS = row 0)"
    )
    mask_padding: bool = Field(
        False,
        description=(
            "mask padded keys in the decoder's attention. The official decoder does not (it has "
            "no attention bias, so it attends to padded positions); True is the cleaner choice "
            "for new models"
        ),
    )
    norm_eps: float = Field(1e-5, gt=0.0)
    attention: AttentionBackendName = Field("auto", description="attention backend")
    init: InitSchemeName = Field("scratch", description="weight init scheme (peace_core.init)")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> DecoderConfig:
        if self.dim % self.heads:
            raise ValueError(f"decoder.dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self

    @classmethod
    def for_encoder(cls, encoder: EncoderConfig, **overrides: object) -> DecoderConfig:
        """A decoder sized for ``encoder``, following the official proportions.

        Width ``min(768, D_enc)``; head width ``min(64, encoder head width)``; FFN
        ``min(encoder FFN, 8/3 · width)``. Gives the official 768/12/2048 for the 4B encoder and
        64/4/128 for ``tiny``. ``overrides`` set any field.
        """
        dim = min(OFFICIAL_DECODER_DIM, encoder.dim)
        head_dim = min(OFFICIAL_DECODER_HEAD_DIM, encoder.head_dim)
        heads = max(1, dim // head_dim)
        while dim % heads:  # keep heads a divisor of dim for unusual widths
            heads -= 1
        sizes = {
            "dim": dim,
            "heads": heads,
            "ffn_dim": min(encoder.ffn_dim, dim * 8 // 3),
            "norm_eps": encoder.norm_eps,
            "attention": encoder.attention,
            "init": encoder.init,
        }
        return cls.model_validate({**sizes, **overrides})

    def encoder_config(self) -> EncoderConfig:
        """The decoder's fusion encoder: no LayerScale, no drop path, no checkpointing."""
        return EncoderConfig(
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            ffn_dim=self.ffn_dim,
            layer_scale_init=None,
            drop_path=0.0,
            norm_eps=self.norm_eps,
            attention=self.attention,
            init=self.init,
        )


@dataclass
class DecoderView:
    """One modality's part of a decoder input.

    ``hidden`` ``[B,K,D_enc]``: the student encoder's outputs at the kept positions; ``keep``
    ``[B,K]`` long: the original position of each (``-1`` = a padding slot); ``padding_mask``
    ``[B,N]`` bool: padding of the FULL-length sequence (``N`` = original length).
    """

    modality: str
    hidden: torch.Tensor
    keep: torch.Tensor
    padding_mask: torch.Tensor


class PretrainDecoder(nn.Module):
    """Fills masked positions and predicts the encoder's outputs there (see module doc).

    Per modality ``m``: ``embed[m]`` Linear(D_enc→D_dec), ``mask_tokens[m]`` ``[1,D_dec]``,
    ``positions[m]`` Embedding(max_positions, D_dec), ``mask_heads[m]`` Linear(D_dec→D_enc);
    plus one :class:`FusionEncoder` holding every modality's FFN and final LayerNorm.
    ``ffn_factories`` may give a modality another FFN (called with the decoder width and FFN
    size); the default is the core GeGLU + Sub-LN FFN.
    """

    def __init__(
        self,
        config: DecoderConfig,
        modalities: Sequence[str],
        encoder_dim: int,
        *,
        ffn_factories: Mapping[str, Callable[[int, int], nn.Module]] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        names = [check_modality_name(name) for name in modalities]
        if not names:
            raise ValueError("PretrainDecoder: expected at least one modality, got none")
        if encoder_dim <= 0:
            raise ValueError(f"PretrainDecoder: encoder_dim must be positive, got {encoder_dim}")
        factories = dict(ffn_factories or {})
        unknown = sorted(set(factories) - set(names))
        if unknown:
            raise KeyError(
                f"PretrainDecoder: ffn_factories name modalities {unknown} that the decoder "
                f"does not have; it has {names}"
            )
        self.config = config
        self.encoder_dim = encoder_dim
        factory = {"device": device, "dtype": dtype}
        dim = config.dim
        self.embed = nn.ModuleDict({m: Linear(encoder_dim, dim, **factory) for m in names})
        self.mask_tokens = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(1, dim, **factory)) for m in names}
        )
        self.positions = nn.ModuleDict(
            {m: nn.Embedding(config.max_positions, dim, **factory) for m in names}
        )
        self.mask_heads = nn.ModuleDict({m: Linear(dim, encoder_dim, **factory) for m in names})

        def ffn_for(name: str) -> Callable[[], nn.Module]:
            if name in factories:
                return lambda: factories[name](dim, config.ffn_dim)
            return lambda: GeGLUFFN(dim, config.ffn_dim, eps=config.norm_eps, **factory)

        self.encoder = FusionEncoder(
            config.encoder_config(), {m: ffn_for(m) for m in names}, **factory
        )
        self.reset_parameters()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.embed.keys())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear layers as the encoder's; mask tokens and positions trunc-normal(0, 0.02)."""
        init_fusion_weights(self.embed, self.config.init)
        init_fusion_weights(self.mask_heads, self.config.init)
        std = LINEAR_INIT_STD
        for token in self.mask_tokens.values():
            nn.init.trunc_normal_(token, std=std, a=-std, b=std)
        for table in self.positions.values():
            nn.init.trunc_normal_(table.weight, std=std, a=-std, b=std)

    def fill(self, view: DecoderView) -> torch.Tensor:
        """The decoder's full-length input ``[B,N,D_dec]`` for one modality.

        Kept positions hold ``embed(hidden)``, all others the mask token; every position then
        gets its absolute-position embedding.
        """
        self._check_view(view)
        size, length = view.padding_mask.shape
        width = self.config.dim
        content = self.embed[view.modality](view.hidden)
        # Padding slots (-1) scatter into one extra column that is dropped afterwards.
        keep = view.keep.to(content.device)
        index = keep.masked_fill(keep < 0, length)
        base = self.mask_tokens[view.modality].to(content.dtype).expand(size, length + 1, width)
        filled = base.scatter(1, index[..., None].expand(-1, -1, width), content)[:, :length]
        return filled + self.positions[view.modality].weight[:length]

    def forward(
        self,
        views: Sequence[DecoderView],
        *,
        outputs_at: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """Decode ``views`` as ONE joint sequence (in the given order): ``[B,N_i,D_enc]`` each.

        ``outputs_at``: per view a ``[B,N_i]`` bool mask (None = all) of the positions whose
        predictions are wanted (the denoising contrast reads only the masked ones). The last
        block then computes only those; other positions hold no prediction.
        """
        if len(views) == 0:
            raise ValueError("PretrainDecoder: expected at least one view, got none")
        names = [view.modality for view in views]
        if len(set(names)) != len(names):
            raise ValueError(f"PretrainDecoder: each modality may appear once, got {names}")
        segments = [
            Segment(view.modality, self.fill(view), view.padding_mask.to(view.hidden.device))
            for view in views
        ]
        output = self.encoder(
            segments, mask_padding=self.config.mask_padding, output_rows=outputs_at
        )
        return [self.mask_heads[m](hidden) for m, hidden in zip(names, output.hidden)]

    def _check_view(self, view: DecoderView) -> None:
        where = f"PretrainDecoder view {view.modality!r}"
        if view.modality not in self.embed:
            raise KeyError(
                f"{where}: the decoder has no such modality; it has {list(self.modalities)}"
            )
        hidden, keep, padding = view.hidden, view.keep, view.padding_mask
        if hidden.ndim != 3 or hidden.shape[-1] != self.encoder_dim:
            raise ValueError(
                f"{where}: hidden must be [B,K,{self.encoder_dim}], got {tuple(hidden.shape)}"
            )
        if keep.dtype != torch.long or tuple(keep.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"{where}: keep must be a long tensor of shape {tuple(hidden.shape[:2])}, got "
                f"{keep.dtype} {tuple(keep.shape)}"
            )
        if padding.dtype != torch.bool or padding.ndim != 2 or padding.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"{where}: padding_mask must be bool [{hidden.shape[0]},N], got "
                f"{padding.dtype} {tuple(padding.shape)}"
            )
        length = padding.shape[1]
        if length > self.config.max_positions:
            raise ValueError(
                f"{where}: sequence of {length} positions exceeds the decoder's max_positions "
                f"({self.config.max_positions})"
            )
        if keep.numel() and (int(keep.min()) < -1 or int(keep.max()) >= length):
            raise ValueError(
                f"{where}: keep positions must lie in 0..{length - 1} (or -1 for padding), got "
                f"{int(keep.min())}..{int(keep.max())}"
            )
