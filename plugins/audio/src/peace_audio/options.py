"""Options of the audio modality; every default is the official ONE-PEACE value (spec §1.2, 3.4)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peace_audio.frames import (
    OFFICIAL_FEATURE_LAYERS,
    ConvLayer,
    frame_count,
    max_samples_for_frames,
    receptive_field,
)

#: Seconds of a clip the preprocessor reads at all, by default (ten minutes).
DEFAULT_MAX_INPUT_DURATION = 600.0

#: Longest audio sequence (CLS included) the 1-D relative-position buckets cover; the same limit as
#: ``peace_core.rel_pos.MAX_TOKEN_POSITIONS`` (kept here so this module stays free of torch).
MAX_AUDIO_TOKENS = 1024


class AudioOptions(BaseModel):
    """Adapter shape, preprocessing and denoising-mask settings of the ``audio`` modality."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    sample_rate: int = Field(16000, gt=0, description="sample rate (Hz) the model reads")
    feature_layers: list[ConvLayer] = Field(
        default_factory=lambda: list(OFFICIAL_FEATURE_LAYERS),
        description=(
            "conv feature extractor, one (out_channels, kernel, stride) per layer; each layer is "
            "Conv1d (no bias) -> LayerNorm over channels -> GELU"
        ),
    )
    conv_pos_depth: int = Field(5, ge=1, description="conv layers of the positional embedding")
    conv_pos_width: int = Field(
        95, ge=1, description="total width; each conv has kernel max(3, width // depth)"
    )
    conv_pos_groups: int = Field(16, ge=1, description="groups of each positional conv")
    conv_pos_sees_padding: bool = Field(
        False,
        description=(
            "True: the positional convs read padded frames, as the official ONE-PEACE does (set "
            "when converting its checkpoints, for parity); a clip's last frames then depend on "
            "the batch, and padded frames' zero-variance LayerNorm inputs send exploding "
            "gradients into the feature extractor. False: padded frames are zeroed first, so a "
            "clip gives the same output batched or alone and padding gets no gradient"
        ),
    )
    grad_checkpointing: bool = Field(
        False,
        description=(
            "recompute each feature-extractor layer in the backward instead of keeping its "
            "activations: less training memory (most of the audio adapter's) for about one more "
            "extractor forward. Independent of encoder.grad_checkpointing (the fusion blocks)"
        ),
    )
    bucket_size: int = Field(512, ge=2, description="1-D relative-position bucket size")
    max_duration: float = Field(
        15.0, gt=0, description="seconds kept from the start of a clip; the rest is cropped"
    )
    min_duration: float = Field(
        1.0, ge=0, description="shorter clips are repeated (tiled) to exactly this many seconds"
    )
    max_input_duration: float = Field(
        DEFAULT_MAX_INPUT_DURATION,
        gt=0,
        description=(
            "seconds of a clip that are read at all: a longer file is decoded only this far and a "
            "longer array cut here, before resampling, so that memory stays bounded whatever the "
            "input (at most this many seconds at the clip's rate, which may not exceed 384 kHz); "
            "the whole-clip normalisation then covers these seconds. At least max_duration"
        ),
    )
    mask_ratio: float = Field(
        0.55, gt=0, lt=1, description="fraction of frames hidden in the audio-only denoising view"
    )
    joint_mask_ratio: float = Field(
        0.45, gt=0, lt=1, description="fraction of frames hidden in the joint audio-text view"
    )
    mask_span: int = Field(
        5, ge=1, description="frames per masked block (block centred on a frame)"
    )
    mask_prob_adjust: float = Field(
        0.1, ge=0, description="extra ratio of block centres drawn before trimming to the count"
    )

    @field_validator("feature_layers")
    @classmethod
    def _positive_layers(cls, layers: list[ConvLayer]) -> list[ConvLayer]:
        if not layers:
            raise ValueError("feature_layers must list at least one (channels, kernel, stride)")
        for index, layer in enumerate(layers):
            if any(value < 1 for value in layer):
                raise ValueError(
                    f"feature_layers[{index}] = {tuple(layer)}: channels, kernel and stride must "
                    "all be positive integers"
                )
        return [tuple(layer) for layer in layers]

    @model_validator(mode="after")
    def _durations_fit(self) -> AudioOptions:
        if self.min_duration > self.max_duration:
            raise ValueError(
                f"min_duration ({self.min_duration} s) must not exceed max_duration "
                f"({self.max_duration} s)"
            )
        if self.max_input_duration < self.max_duration:
            raise ValueError(
                f"max_input_duration ({self.max_input_duration} s) must be at least max_duration "
                f"({self.max_duration} s): the model reads the first max_duration seconds"
            )
        if frame_count(self.max_samples, self.feature_layers) < 1:
            raise ValueError(
                f"max_duration {self.max_duration} s ({self.max_samples} samples) is shorter than "
                f"the feature extractor's receptive field ({receptive_field(self.feature_layers)} "
                "samples): no frame would come out"
            )
        if frame_count(self.max_samples, self.feature_layers) + 1 > MAX_AUDIO_TOKENS:
            limit = max_samples_for_frames(MAX_AUDIO_TOKENS - 1, self.feature_layers)
            raise ValueError(
                f"max_duration {self.max_duration} s gives more than {MAX_AUDIO_TOKENS} tokens "
                f"(CLS included), the relative-position limit; at {self.sample_rate} Hz with "
                f"these feature_layers use max_duration <= {limit / self.sample_rate:.4f} s"
            )
        return self

    @property
    def feature_dim(self) -> int:
        """Channels the feature extractor outputs (its last layer's)."""
        return self.feature_layers[-1][0]

    @property
    def conv_pos_kernel(self) -> int:
        """Kernel of each positional conv (the official ``max(3, width // depth)``)."""
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    @property
    def max_samples(self) -> int:
        """Samples kept per clip: ``max_duration`` seconds at ``sample_rate``."""
        return round(self.max_duration * self.sample_rate)

    @property
    def min_samples(self) -> int:
        """Exact length of a tiled short clip: ``min_duration`` seconds at ``sample_rate``."""
        return round(self.min_duration * self.sample_rate)
