"""The audio adapter (spec §1.2): waveform -> conv features -> projected frames + conv positions.

The sequence it returns is ``[CLS; frame_1 .. frame_T]`` with ``T`` the frames of the padded
batch. Each clip's own frame count follows from its ``lengths`` entry with the closed form of
:func:`peace_audio.frames.frame_count`; later frames are padding.

As in the official model, the conv positional embedding (receptive field of about 90 frames) also
reads the features of padded frames, so a clip's last valid frames differ slightly between a
padded batch and the clip run alone. This is kept on purpose: it is what official checkpoints were
trained with.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peace_audio.frames import ConvLayer, frame_count, max_samples_for_frames, receptive_field
from peace_audio.options import MAX_AUDIO_TOKENS, AudioOptions
from peace_core.rel_pos import gather_bucket_index, token_bucket_index, token_bucket_rows
from peace_registry.contract import AdapterOutput, RelativePositions
from peace_registry.errors import PeaceError

#: The batch key under which :meth:`AudioAdapter.precompute` leaves the projected features.
FRAMES_KEY = "frames"

#: Std (and cut-off) of the truncated-normal init of the projection, CLS and CLS position (§2.6).
INIT_STD = 0.02


class AudioBatchError(PeaceError, ValueError):
    """A collated audio batch (or ``keep`` selection) the adapter cannot read."""


class FeatureExtractorLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels -> GELU, channels last: ``[B, L, C_in] ->
    [B, L', C_out]``.

    The convolution runs as one GEMM over the unfolded windows rather than ``F.conv1d``: with the
    channels last the norm needs no transposes, and on CPU this is about 1.5x faster forward and
    backward than conv1d with 512 channels (``benchmarks/workloads.py``, audio workloads), equal
    to it within float rounding. The weight keeps ``nn.Conv1d``'s ``[C_out, C_in, kernel]``
    layout, so checkpoints and the official key map are unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        layer: ConvLayer,
        *,
        eps: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels, kernel, stride = layer
        factory = {"device": device, "dtype": dtype}
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=False, **factory)
        self.norm = nn.LayerNorm(channels, eps=eps, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, in_channels = x.shape
        kernel, stride = self.kernel, self.stride
        frames = (length - kernel) // stride + 1
        if frames < 1:
            raise AudioBatchError(
                f"audio feature extractor: {length} input steps are fewer than a conv layer's "
                f"kernel ({kernel}); clips must be at least the receptive field long"
            )
        weight = self.conv.weight
        if kernel == stride:  # disjoint windows: a reshape, no copy; window laid out kernel-major
            windows = x[:, : frames * stride].reshape(batch, frames, kernel * in_channels)
            weight = weight.permute(0, 2, 1)
        else:  # overlapping windows laid out channel-major, as conv1d's weight is
            windows = x.unfold(1, kernel, stride).flatten(2)
        return F.gelu(self.norm(windows @ weight.reshape(weight.shape[0], -1).t()))


class FeatureExtractor(nn.Module):
    """wav2vec 2.0-style stack of strided "valid" convolutions: ``[B, S] -> [B, T, C]``.

    ``checkpointing=True`` recomputes each layer in the backward instead of keeping its
    activations (several ``[B, T, 512]`` tensors per layer at 16 kHz): the extractor's share of
    training memory drops to its layer inputs, for about one more forward of compute.
    """

    def __init__(
        self,
        layers: list[ConvLayer],
        *,
        eps: float,
        checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec = [tuple(layer) for layer in layers]
        self.checkpointing = checkpointing
        in_channels = [1] + [channels for channels, _, _ in self.spec[:-1]]
        self.layers = nn.ModuleList(
            FeatureExtractorLayer(c_in, layer, eps=eps, device=device, dtype=dtype)
            for c_in, layer in zip(in_channels, self.spec)
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.unsqueeze(-1)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x


class ConvPositionLayer(nn.Module):
    """Grouped Conv1d (same length) -> LayerNorm without affine -> GELU, on ``[B, D, T]``."""

    def __init__(
        self,
        dim: int,
        kernel: int,
        groups: int,
        *,
        eps: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups, **factory)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False, **factory)
        # An even kernel with padding k//2 makes one extra output frame; drop it to keep T.
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.trim:
            x = x[..., : -self.trim]
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class ConvPositionalEmbedding(nn.Module):
    """Stack of :class:`ConvPositionLayer`: features ``[B, T, D]`` -> positions ``[B, T, D]``."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        kernel: int,
        groups: int,
        eps: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ConvPositionLayer(dim, kernel, groups, eps=eps, device=device, dtype=dtype)
            for _ in range(depth)
        )

    def forward(self, features: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``padding`` ``[B, T]`` (True: a padded frame): zeroed before every layer, so that the
        convs see exactly what a clip alone sees (zeros past its end)."""
        x = features.transpose(1, 2)
        for layer in self.layers:
            if padding is not None:
                x = x.masked_fill(padding[:, None, :], 0.0)
            x = layer(x)
        return x.transpose(1, 2)


class AudioAdapter(nn.Module):
    """Collated audio batch (``waveform`` [B,S], ``lengths`` [B]) -> ``[CLS; frames]`` tokens.

    ``forward(batch, keep=None)`` follows the :class:`~peace_registry.contract.Adapter` protocol.
    With ``keep`` the features are gathered at the kept frames first and the conv positional
    embedding runs on that compacted sequence (spec §3.3 step 2), frames in ``keep`` order, padded
    with zero features to the longest row. Slots with ``keep == -1`` are padding.

    A batch that is not ``waveform`` [B,S] float + ``lengths`` [B] integer, or whose ``S`` gives
    more than 1024 tokens, is an :class:`AudioBatchError` raised before any work is done. Sample
    values are not checked, to keep the forward free of host-device synchronisation: NaN or inf,
    or values far beyond the preprocessor's unit-variance output, give non-finite tokens, which a
    model in eval mode refuses with a ``ComponentOutputError`` naming ``waveform`` (the
    preprocessor itself refuses such clips).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        options: AudioOptions,
        *,
        num_bias_tables: int = 1,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % options.conv_pos_groups:
            raise ValueError(
                f"audio adapter: dim {dim} is not divisible by conv_pos_groups "
                f"{options.conv_pos_groups}; choose a conv_pos_groups that divides the model dim"
            )
        if heads < 1 or num_bias_tables < 1:
            raise ValueError(
                f"audio adapter: heads ({heads}) and num_bias_tables ({num_bias_tables}) "
                "must be >= 1"
            )
        factory = {"device": device, "dtype": dtype}
        self.options = options
        self.dim = dim
        self.feature_extractor = FeatureExtractor(
            options.feature_layers, eps=eps, checkpointing=options.grad_checkpointing, **factory
        )
        self.feature_norm = nn.LayerNorm(options.feature_dim, eps=eps, **factory)
        self.feature_proj = nn.Linear(options.feature_dim, dim, **factory)
        self.conv_pos = ConvPositionalEmbedding(
            dim,
            depth=options.conv_pos_depth,
            kernel=options.conv_pos_kernel,
            groups=options.conv_pos_groups,
            eps=eps,
            **factory,
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **factory))
        self.cls_pos = nn.Parameter(torch.empty(1, 1, dim, **factory))
        rows = token_bucket_rows(options.bucket_size)
        self.rel_pos_tables = nn.ModuleList(
            nn.Embedding(rows, heads, **factory) for _ in range(num_bias_tables)
        )
        if not self.cls_token.is_meta:  # meta tensors hold no values; init after to_empty()
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spec §2.6: kaiming-normal feature convs, trunc-normal(±0.02) Linear/CLS, zero tables."""
        for layer in self.feature_extractor.layers:
            nn.init.kaiming_normal_(layer.conv.weight)
            layer.norm.reset_parameters()
        self.feature_norm.reset_parameters()
        nn.init.trunc_normal_(self.feature_proj.weight, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        nn.init.zeros_(self.feature_proj.bias)
        for layer in self.conv_pos.layers:
            layer.conv.reset_parameters()  # torch's default, as the official model leaves it
        for param in (self.cls_token, self.cls_pos):
            nn.init.trunc_normal_(param, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        for table in self.rel_pos_tables:
            nn.init.zeros_(table.weight)

    # ------------------------------------------------------------------------------ helpers

    @property
    def feature_layers(self) -> list[ConvLayer]:
        return self.feature_extractor.spec

    def frame_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per clip, ``[B]`` long, from its sample count."""
        return frame_count(lengths, self.feature_layers)

    def _read_batch(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in ("waveform", "lengths") if key not in batch]
        if missing:
            raise AudioBatchError(
                f"audio batch is missing {missing}: expected 'waveform' [B,S] float and 'lengths' "
                f"[B] long (got keys {sorted(batch)})"
            )
        waveform, lengths = batch["waveform"], batch["lengths"]
        if not isinstance(waveform, torch.Tensor) or waveform.ndim != 2:
            shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform)
            raise AudioBatchError(f"audio batch 'waveform' must be a [B,S] tensor, got {shape}")
        if not waveform.is_floating_point():
            raise AudioBatchError(f"audio batch 'waveform' must be float, got {waveform.dtype}")
        batch_size, samples = waveform.shape
        if (
            not isinstance(lengths, torch.Tensor)
            or lengths.shape != (batch_size,)
            or lengths.is_floating_point()
            or lengths.is_complex()
            or lengths.dtype == torch.bool
        ):
            got = (
                f"{lengths.dtype} of shape {tuple(lengths.shape)}"
                if isinstance(lengths, torch.Tensor)
                else type(lengths).__name__
            )
            raise AudioBatchError(
                f"audio batch 'lengths' must be a [{batch_size}] integer tensor (samples per "
                f"clip), got {got}"
            )
        # Before anything runs: a long waveform would make the extractor allocate [B, T, C] per
        # layer only to be refused afterwards.
        self._check_token_limit(frame_count(samples, self.feature_layers) + 1, samples)
        needed = receptive_field(self.feature_layers)
        if batch_size and (lengths.min() < needed or lengths.max() > samples):
            raise AudioBatchError(
                f"audio batch 'lengths' {lengths.tolist()} must lie in [{needed}, {samples}]: at "
                f"least the feature extractor's receptive field ({needed} samples) and at most the "
                f"waveform width S={samples}"
            )
        return waveform.to(self.cls_token.dtype), lengths.long()

    def _check_token_limit(self, tokens: int, samples: int) -> None:
        if tokens > MAX_AUDIO_TOKENS:
            limit = max_samples_for_frames(MAX_AUDIO_TOKENS - 1, self.feature_layers)
            rate = self.options.sample_rate
            raise AudioBatchError(
                f"audio of {samples} samples ({samples / rate:.2f} s at {rate} Hz) gives {tokens} "
                f"tokens with CLS, over the relative-position limit of {MAX_AUDIO_TOKENS}: clips "
                f"may be at most {limit} samples ({limit / rate:.4f} s); lower max_duration"
            )

    @staticmethod
    def _check_keep(keep: torch.Tensor, batch_size: int, tokens: int) -> torch.Tensor:
        if not isinstance(keep, torch.Tensor) or keep.ndim != 2 or keep.shape[0] != batch_size:
            shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep)
            raise AudioBatchError(f"audio keep must be a [{batch_size},K] long tensor, got {shape}")
        if keep.is_floating_point() or keep.dtype == torch.bool:
            raise AudioBatchError(f"audio keep must hold integer positions, got {keep.dtype}")
        if keep.numel() and (keep.min() < -1 or keep.max() >= tokens):
            raise AudioBatchError(
                f"audio keep holds positions outside [-1, {tokens - 1}] (the audio sequence has "
                f"{tokens} tokens with CLS; -1 marks padding)"
            )
        return keep.long()

    # ------------------------------------------------------------------------------ forward

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        waveform, lengths = self._read_batch(batch)
        frames = batch.get(FRAMES_KEY)
        if frames is None:
            frames = self._frames(waveform)
        else:
            self._check_frames(frames, waveform)
        batch_size, num_frames, dim = frames.shape
        tokens = num_frames + 1
        device = frames.device

        frame_padding = (
            torch.arange(num_frames, device=device) >= self.frame_counts(lengths)[:, None]
        )
        cls_padding = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
        padding_mask = torch.cat([cls_padding, frame_padding], dim=1)
        index = token_bucket_index(tokens, self.options.bucket_size).to(device)
        tables = list(self.rel_pos_tables)
        cls = (self.cls_token + self.cls_pos).expand(batch_size, 1, dim)
        sees_padding = self.options.conv_pos_sees_padding
        if not sees_padding:
            # Zeroed padded frames: no batch-dependence, and no gradient into padding.
            frames = frames.masked_fill(frame_padding[..., None], 0.0)

        if keep is None:
            positions = self.conv_pos(frames, None if sees_padding else frame_padding)
            x = torch.cat([cls, frames + positions], dim=1)
            return AdapterOutput(x, padding_mask, RelativePositions(index, tables))

        keep = self._check_keep(keep, batch_size, tokens).to(device)
        x = self._kept_tokens(frames, cls, keep, frame_padding)
        kept_padding = (keep < 0) | padding_mask.gather(1, keep.clamp(min=0))
        return AdapterOutput(
            x, kept_padding, RelativePositions(gather_bucket_index(index, keep), tables)
        )

    def precompute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch plus its projected conv features (API 1.4): the feature extractor, most of
        the adapter's work, then runs once for all the views of a pretraining step."""
        waveform, _ = self._read_batch(batch)
        return {**batch, FRAMES_KEY: self._frames(waveform)}

    def _check_frames(self, frames: object, waveform: torch.Tensor) -> None:
        frames_expected = frame_count(waveform.shape[1], self.feature_layers)
        expected = (waveform.shape[0], frames_expected, self.dim)
        if not isinstance(frames, torch.Tensor) or tuple(frames.shape) != expected:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames)
            raise AudioBatchError(
                f"audio batch {FRAMES_KEY!r} must be this adapter's precompute() output for the "
                f"batch's waveform, shape {list(expected)}; got {got}"
            )

    def _frames(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(self.feature_norm(self.feature_extractor(waveform)))

    def _kept_tokens(
        self,
        frames: torch.Tensor,
        cls: torch.Tensor,
        keep: torch.Tensor,
        frame_padding: torch.Tensor,
    ) -> torch.Tensor:
        """Tokens at the kept positions; positional convs see only the kept frames, compacted."""
        batch_size, slots = keep.shape
        dim = frames.shape[-1]
        is_frame = keep >= 1
        gathered = frames.gather(1, (keep - 1).clamp(min=0)[..., None].expand(-1, -1, dim))
        gathered = gathered * is_frame[..., None].to(gathered.dtype)
        # Move each row's frame slots to the front (stable: keep order), conv there, move back.
        order = torch.argsort((~is_frame).to(torch.int8), dim=1, stable=True)
        longest = int(is_frame.sum(dim=1).max()) if slots and batch_size else 0
        positions = torch.zeros_like(gathered)
        if longest:
            front = order[:, :longest, None].expand(-1, -1, dim)
            compact = gathered.gather(1, front)
            padding = None
            if not self.options.conv_pos_sees_padding:  # empty slots and padded frames
                valid = is_frame & ~frame_padding.gather(1, (keep - 1).clamp(min=0))
                padding = ~valid.gather(1, order[:, :longest])
            positions = positions.scatter(1, front, self.conv_pos(compact, padding))
        frame_tokens = gathered + positions
        return torch.where((keep == 0)[..., None], cls.expand(batch_size, slots, dim), frame_tokens)
