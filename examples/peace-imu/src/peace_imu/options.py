"""Options of the imu modality: every setting of the adapter, the preprocessor and the masker.

Imports only pydantic (and the standard library), so the entry module stays cheap to import. A
model config holds one dict of these per modality; every field has a default, so ``ImuOptions()``
is a working model: 50 Hz, windows of up to 10 s, one token per 0.2 s.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The six input columns, in the order the model reads them: accelerometer (m/s²), gyroscope
#: (rad/s).
CHANNELS: tuple[str, ...] = ("ax", "ay", "az", "gx", "gy", "gz")
#: Standard gravity (m/s²): the default accelerometer scale, so 1.0 means 1 g.
STANDARD_GRAVITY = 9.80665
#: Longest sequence (CLS included) the 1-D relative-position buckets cover; the same limit as
#: ``peace_core.rel_pos.MAX_TOKEN_POSITIONS`` (kept here so this module stays free of torch).
MAX_IMU_TOKENS = 1024


class ImuOptions(BaseModel):
    """Adapter shape, preprocessing and denoising-mask settings of the ``imu`` modality."""

    model_config = ConfigDict(extra="forbid")  # a typo in a config must fail, not be ignored

    sample_rate: float = Field(
        50.0, gt=0, description="Hz the model reads: every input is resampled to it"
    )
    source_rate: float = Field(
        50.0,
        gt=0,
        description="Hz of inputs that carry neither a rate nor timestamps (arrays, .npy, CSV "
        "without a t column)",
    )
    max_seconds: float = Field(
        10.0, gt=0, description="longest window; longer ones are cropped (random crop in training)"
    )
    patch_size: int = Field(10, ge=1, description="samples per token (10 at 50 Hz = 0.2 s)")
    bucket_size: int = Field(64, ge=2, description="1-D relative-position buckets (distances)")
    channel_scales: tuple[float, float, float, float, float, float] = Field(
        (STANDARD_GRAVITY,) * 3 + (math.pi,) * 3,
        description="fixed divisors of ax, ay, az, gx, gy, gz: accelerometer in g, gyroscope in "
        "units of π rad/s (constants, never statistics of the data)",
    )
    mask_ratio: float = Field(
        0.5, gt=0, lt=1, description="fraction of patches hidden in the imu-only denoising view"
    )
    joint_mask_ratio: float = Field(
        0.5, gt=0, lt=1, description="fraction of patches hidden in the joint (imu-text) view"
    )
    mask_span: int = Field(3, ge=1, description="patches per hidden span (contiguous in time)")

    @field_validator("channel_scales")
    @classmethod
    def _positive_scales(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        bad = [
            f"{name}={value}"
            for name, value in zip(CHANNELS, scales)
            if not (math.isfinite(value) and value > 0)
        ]
        if bad:
            raise ValueError(f"channel_scales must be finite and positive, got {', '.join(bad)}")
        return scales

    @model_validator(mode="after")
    def _window_fits(self) -> ImuOptions:
        if self.max_patches < 1:
            raise ValueError(
                f"max_seconds {self.max_seconds} at sample_rate {self.sample_rate} Hz is "
                f"{self.max_seconds * self.sample_rate:g} samples, fewer than one patch of "
                f"patch_size {self.patch_size}"
            )
        if self.max_patches + 1 > MAX_IMU_TOKENS:
            raise ValueError(
                f"max_seconds {self.max_seconds} at sample_rate {self.sample_rate} Hz gives "
                f"{self.max_patches} patches of {self.patch_size} samples; at most "
                f"{MAX_IMU_TOKENS - 1} fit the relative-position buckets: lower max_seconds or "
                "raise patch_size"
            )
        return self

    @property
    def max_patches(self) -> int:
        """Most tokens (patches, CLS excluded) per window."""
        # The epsilon keeps e.g. 0.3 s * 10 Hz (2.9999999999999996 in floats) at 3 samples.
        return math.floor(self.max_seconds * self.sample_rate + 1e-6) // self.patch_size

    @property
    def max_samples(self) -> int:
        """Most samples per window at ``sample_rate``: whole patches only."""
        return self.max_patches * self.patch_size
