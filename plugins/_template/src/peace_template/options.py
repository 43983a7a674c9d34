"""Options of the signal modality: every setting of the adapter, the preprocessor and the masker.

Imports only pydantic, so the entry module stays cheap to import. A model config holds one dict of
these per modality; every field needs a default, so ``SignalOptions()`` is a working model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SignalOptions(BaseModel):
    """Adapter shape, preprocessing and denoising-mask settings of the ``signal`` modality."""

    model_config = ConfigDict(extra="forbid")  # a typo in a config must fail, not be ignored

    channels: int = Field(6, gt=0, description="channels per time step (e.g. 6 for an IMU)")
    frame_size: int = Field(16, gt=0, description="time steps per token")
    max_frames: int = Field(
        256, gt=0, le=1023, description="most tokens (frames) per sample; longer signals are cut"
    )
    bucket_size: int = Field(64, ge=2, description="1-D relative-position buckets (distances)")
    standardize: bool = Field(
        True, description="scale each channel of a sample to zero mean and unit variance"
    )
    mask_ratio: float = Field(
        0.5, gt=0, lt=1, description="fraction of frames hidden in the signal-only denoising view"
    )
    joint_mask_ratio: float = Field(
        0.5, gt=0, lt=1, description="fraction of frames hidden in the joint (signal-text) view"
    )
