"""Options of the vision modality; every default is the official ONE-PEACE value (spec §1.1, §3.4).

This module imports only pydantic, so the plugin's entry module stays fast to import.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Pixels per patch side: the hMLP stem's total stride (4 * 2 * 2).
PATCH_SIZE = 16

#: The CLIP normalisation ONE-PEACE uses (``one_peace/data/base_dataset.py``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionOptions(BaseModel):
    """Adapter shape, preprocessing and denoising-mask settings of the ``vision`` modality."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    image_size: int = Field(
        256,
        gt=0,
        multiple_of=PATCH_SIZE,
        description="side (pixels) images are resized or cropped to; a multiple of 16",
    )
    pos_bucket_size: int | None = Field(
        None,
        gt=0,
        description=(
            "side of the learned absolute-position grid (pos_embed has side^2 + 1 rows); "
            "None means image_size // 16. Other patch grids interpolate it bicubically"
        ),
    )
    rel_bucket_size: int | None = Field(
        None,
        gt=0,
        description=(
            "R of the 2-D relative-position buckets ((2R-1)^2 + 3 table rows); None means "
            "image_size // 16. A patch grid side may not exceed it"
        ),
    )
    mean: tuple[float, float, float] = Field(
        CLIP_MEAN, description="per-channel mean (RGB, on [0,1] pixels) subtracted before the model"
    )
    std: tuple[float, float, float] = Field(
        CLIP_STD, description="per-channel std (RGB, on [0,1] pixels) the pixels are divided by"
    )
    train_crop_scale: tuple[float, float] = Field(
        (0.9, 1.0),
        description="RandomResizedCrop area range (fraction of the image) used when train=True",
    )
    train_crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3),
        description="RandomResizedCrop aspect-ratio range (width/height) used when train=True",
    )
    mask_ratio: float = Field(
        0.75, gt=0, lt=1, description="fraction of patches hidden in the image-only denoising view"
    )
    joint_mask_ratio: float = Field(
        0.6875,
        gt=0,
        lt=1,
        description=(
            "fraction of patches hidden in the joint image-text view; its visible patches are "
            "drawn from those the image-only view hid"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> VisionOptions:
        if any(value <= 0 for value in self.std):
            raise ValueError(f"std must be positive in every channel, got {self.std}")
        low, high = self.train_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"train_crop_scale {self.train_crop_scale}: expected 0 < low <= high <= 1"
            )
        low, high = self.train_crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"train_crop_ratio {self.train_crop_ratio}: expected 0 < low <= high")
        if self.grid_size > self.rel_grid_size:
            raise ValueError(
                f"image_size {self.image_size} gives a {self.grid_size}x{self.grid_size} patch "
                f"grid, larger than rel_bucket_size {self.rel_grid_size}: use rel_bucket_size >= "
                f"{self.grid_size} or a smaller image_size"
            )
        return self

    @property
    def grid_size(self) -> int:
        """Patches per side of an ``image_size`` image."""
        return self.image_size // PATCH_SIZE

    @property
    def pos_grid_size(self) -> int:
        """Side of the learned absolute-position grid (``pos_bucket_size`` resolved)."""
        return self.pos_bucket_size if self.pos_bucket_size is not None else self.grid_size

    @property
    def rel_grid_size(self) -> int:
        """R of the relative-position buckets (``rel_bucket_size`` resolved)."""
        return self.rel_bucket_size if self.rel_bucket_size is not None else self.grid_size


def as_vision_options(options: object) -> VisionOptions:
    """``options`` as :class:`VisionOptions`: an instance as is; a mapping, ``None`` (defaults) or
    another pydantic model (by its fields) validated. Anything else is a ``TypeError``."""
    if isinstance(options, VisionOptions):
        return options
    if options is None:
        return VisionOptions()
    if isinstance(options, BaseModel):
        return VisionOptions.model_validate(options.model_dump())
    if isinstance(options, dict):
        return VisionOptions.model_validate(options)
    raise TypeError(
        f"vision options: expected VisionOptions, a dict or None, got {type(options).__name__}"
    )
