"""Model configuration: pydantic models that reject unknown fields (a typo lists the valid ones)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The modality ONE-PEACE anchors the others to: each is aligned with it, it leads joint sequences,
#: and captions and class prompts are written in it. The default of ``objective.anchor`` and the
#: modality of captions in data shards and evaluation; the one modality name the core knows.
ANCHOR_MODALITY = "text"

AttentionBackendName = Literal["auto", "math", "sdpa", "xformers"]
InitSchemeName = Literal["scratch", "official"]
#: The per-modality components a config may pick a named variant of.
VariantKind = Literal["adapter", "ffn", "masker", "preprocessor"]


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class EncoderConfig(StrictModel):
    """The shared fusion encoder (spec §2)."""

    dim: int = Field(64, gt=0, description="hidden size D")
    depth: int = Field(2, gt=0, description="number of fusion blocks")
    heads: int = Field(4, gt=0, description="attention heads; must divide dim")
    ffn_dim: int = Field(128, gt=0, description="inner size of the per-modality FFNs")
    layer_scale_init: float | None = Field(
        1e-6, description="initial LayerScale value; None disables LayerScale"
    )
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="max drop-path rate (linear ramp)")
    norm_eps: float = Field(1e-5, gt=0.0)
    rel_pos_tables: Literal["shared", "per_layer"] = Field(
        "shared", description="one relative-position table per modality, or one per layer"
    )
    attention: AttentionBackendName = Field(
        "auto", description="attention backend; the PEACE_ATTENTION env variable overrides it"
    )
    grad_checkpointing: bool = Field(
        False,
        description=(
            "recompute each fusion block in the backward instead of keeping its activations: "
            "training memory of the encoder drops to one block's, for about one more forward"
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "compile each fusion block with torch.compile (Inductor) when the model is built; "
            "the first batches of each new shape pay the compile time. Outputs are unchanged "
            "within 1e-5"
        ),
    )
    init: InitSchemeName = Field(
        "scratch",
        description=(
            "weight init of the fusion layers and projections: 'scratch' (fan-in scaled, trains "
            "from scratch) or 'official' (ONE-PEACE's trunc-normal 0.02; one-peace-4b and "
            "converted checkpoints). See peace_core.init"
        ),
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> EncoderConfig:
        if self.dim % self.heads:
            raise ValueError(f"encoder.dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_bias_tables(self) -> int:
        return 1 if self.rel_pos_tables == "shared" else self.depth


class ModelConfig(StrictModel):
    """A whole model: encoder sizes plus one option dict per modality.

    Each modality's dict is validated by that modality plugin's options model when the model is
    built (``peace_core.create_model``), so a typo there is reported with the plugin's fields.
    """

    name: str = "custom"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    modalities: dict[str, dict[str, Any]] = Field(default_factory=dict)
    variants: dict[str, dict[VariantKind, str]] = Field(
        default_factory=dict,
        description=(
            "named component variants per modality, e.g. {vision = {masker = 'block'}} builds the "
            "masker registered as 'vision:block' (by any plugin); unlisted components use the "
            "modality's default"
        ),
    )
    logit_scale_init: float = Field(math.log(1 / 0.07), description="log of the initial 1/τ")
    logit_scale_max: float = Field(math.log(100.0), description="log of the clamp on 1/τ")

    @model_validator(mode="after")
    def _variants_of_configured_modalities(self) -> ModelConfig:
        stray = sorted(set(self.variants) - set(self.modalities))
        if stray:
            raise ValueError(
                f"variants name modalities {stray} that the model does not have; it has "
                f"{sorted(self.modalities)}"
            )
        return self
