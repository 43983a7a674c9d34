"""Helpers for testing plugins and code that uses the registry.

- :func:`temporary_plugins` / :func:`use_registry`: swap the process-wide registry for one made of
  in-process plugin objects, restored afterwards.
- :func:`write_plugin_distribution` / :func:`on_sys_path` / :func:`discover_in`: a throwaway plugin
  *distribution* (dist-info with ``entry_points.txt`` plus modules) that ``importlib.metadata``
  discovers exactly like an installed one.
- :class:`ToyPlugin`: a tiny but complete modality (sequences of numbers) implementing the whole
  contract: a reference for the conformance suite and for core tests that need a modality
  without the real plugins.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import random
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peace_registry.contract import (
    PLUGIN_API_VERSION,
    AdapterOutput,
    AdapterSpec,
    ArchitectureSpec,
    BuildContext,
    FFNSpec,
    MaskerSpec,
    ModalitySpec,
    PreprocessorSpec,
    RelativePositions,
)
from peace_registry.discovery import entry_point_sources, load_plugins
from peace_registry.hookspecs import hookimpl
from peace_registry.registry import (
    Registry,
    disabled_from_env,
    strict_from_env,
    swap_registry,
)

# --------------------------------------------------------------------------------------------
# Swapping the process-wide registry
# --------------------------------------------------------------------------------------------


@contextmanager
def use_registry(registry: Registry | None) -> Iterator[Registry | None]:
    """Make ``registry`` the one :func:`peace_registry.get_registry` returns, then restore the
    previous one. ``None`` means "rediscover on next use"."""
    previous = swap_registry(registry)
    try:
        yield registry
    finally:
        swap_registry(previous)


@contextmanager
def temporary_plugins(
    plugins: Mapping[str, object], *, installed: bool = False, strict: bool | None = None
) -> Iterator[Registry]:
    """A fresh registry holding ``plugins`` (name -> module or object with hookimpls), installed
    as the process-wide registry for the duration of the block.

    ``installed=True`` adds them to the installed entry-point plugins (strictness from the
    environment unless given); otherwise the registry holds only them (strict unless given).
    """
    if installed:
        registry = Registry.discover(strict=strict, extra_plugins=plugins)
    else:
        registry = Registry.from_plugins(plugins, strict=True if strict is None else strict)
    with use_registry(registry):
        yield registry


# --------------------------------------------------------------------------------------------
# Throwaway distributions
# --------------------------------------------------------------------------------------------


def _dist_info_name(dist: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', dist)}-{version}.dist-info"


def write_plugin_distribution(
    root: Path | str,
    dist: str,
    *,
    entry_points: Mapping[str, str],
    files: Mapping[str, str],
    version: str = "0.1.0",
) -> Path:
    """Write a minimal installed distribution into ``root`` and return ``root``.

    ``entry_points`` maps plugin names to targets (``"lidar": "peace_lidar_toy.plugin"``) in the
    ``peace.plugins`` group; ``files`` maps paths relative to ``root`` to their source text.
    Put ``root`` on ``sys.path`` (:func:`on_sys_path`, or ``PYTHONPATH`` for a subprocess) to
    have it discovered.
    """
    root = Path(root)
    info = root / _dist_info_name(dist, version)
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = ["[peace.plugins]", *(f"{name} = {target}" for name, target in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return root


def distributions_in(root: Path | str) -> set[str]:
    """Names of the distributions whose metadata lives directly in ``root``."""
    return {d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(root)])}


@contextmanager
def on_sys_path(root: Path | str) -> Iterator[Path]:
    """Put ``root`` first on ``sys.path`` (its distributions become discoverable); afterwards
    remove it, forget the modules imported from it, and restore the process-wide registry."""
    root = Path(root).resolve()
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    previous = swap_registry(None)
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name, module in list(sys.modules.items()):
            location = getattr(module, "__file__", None)
            if location and Path(location).resolve().is_relative_to(root):
                del sys.modules[name]
        importlib.invalidate_caches()
        swap_registry(previous)


def discover_in(
    root: Path | str, *, strict: bool | None = None, disabled: Iterable[str] | None = None
) -> Registry:
    """Like :meth:`Registry.discover`, but only over the entry points of the distributions in
    ``root`` (which must be on ``sys.path``), so tests do not depend on what else is installed."""
    ours = distributions_in(root)
    sources = [s for s in entry_point_sources() if s.dist in ours]
    return Registry(
        load_plugins(
            sources,
            strict=strict_from_env() if strict is None else strict,
            disabled=disabled_from_env() if disabled is None else disabled,
        )
    )


# --------------------------------------------------------------------------------------------
# A toy modality: sequences of numbers
# --------------------------------------------------------------------------------------------


class ToyOptions(BaseModel):
    """Options of the toy modality."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(12, gt=0, description="longest sequence (CLS excluded)")
    bucket_size: int = Field(6, ge=2, description="relative distances are clamped to ±(size-1)")
    mask_ratio: float = Field(0.5, ge=0.0, le=1.0, description="single-view masking ratio")
    joint_mask_ratio: float = Field(0.25, ge=0.0, le=1.0, description="joint-view masking ratio")


class ToyPreprocessor:
    """Raw item: a sequence of numbers (list, tuple, 1-D tensor, or "1 2 3" text)."""

    def __init__(self, options: ToyOptions) -> None:
        self.options = options
        self.decoders = {"toy": lambda data: data.decode("utf-8")}

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        if isinstance(item, str):
            try:
                item = [float(v) for v in item.split()]
            except ValueError:
                raise ValueError(
                    f"toy item {item!r:.60}: expected numbers separated by spaces"
                ) from None
        if isinstance(item, torch.Tensor):
            item = item.tolist()
        if not isinstance(item, (list, tuple)) or not all(
            isinstance(v, (int, float)) for v in item
        ):
            raise TypeError(f"toy item {item!r:.60}: expected a sequence of numbers")
        if not 0 < len(item) <= self.options.max_length:
            raise ValueError(
                f"toy item of length {len(item)}: expected 1..{self.options.max_length} numbers"
            )
        return {"values": torch.tensor(item, dtype=torch.float32)}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(s["values"]) for s in samples])
        values = torch.zeros(len(samples), int(lengths.max()))
        for row, sample in enumerate(samples):
            values[row, : len(sample["values"])] = sample["values"]
        return {"values": values, "lengths": lengths}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        rng = random.Random(seed)
        lengths = [rng.randint(1, self.options.max_length) for _ in range(count)]
        return [[round(rng.uniform(-2, 2), 3) for _ in range(n)] for n in lengths]


def toy_padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, 1+width]``: CLS never padded; position p (1-based) padded when p > length."""
    positions = torch.arange(width + 1, device=lengths.device)
    return positions[None, :] > lengths[:, None]


class ToyAdapter(nn.Module):
    """Embeds each number, prepends CLS, adds absolute positions, clamped relative distances."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        options: ToyOptions = ctx.options  # type: ignore[assignment]
        factory = {"device": ctx.device, "dtype": ctx.dtype}
        self.bucket_size = options.bucket_size
        self.value_proj = nn.Linear(1, ctx.dim, **factory)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, ctx.dim, **factory))
        self.pos_embed = nn.Embedding(options.max_length + 1, ctx.dim, **factory)
        rows = 2 * options.bucket_size - 1
        self.rel_pos_tables = nn.ModuleList(
            nn.Embedding(rows, ctx.heads, **factory) for _ in range(ctx.num_bias_tables)
        )
        if not self.cls_token.is_meta:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def relative_index(self, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.cls_token.device)
        span = self.bucket_size - 1
        return (positions[:, None] - positions[None, :]).clamp(-span, span) + span

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        values, lengths = batch["values"], batch["lengths"]
        size, width = values.shape
        embedded = self.value_proj(values[..., None].to(self.cls_token.dtype))
        tokens = torch.cat([self.cls_token.expand(size, 1, -1), embedded], dim=1)
        tokens = tokens + self.pos_embed.weight[: width + 1]
        padding = toy_padding_mask(lengths, width)
        index = self.relative_index(width + 1)
        if keep is not None:
            safe = keep.clamp(min=0)
            tokens = tokens.gather(1, safe[..., None].expand(-1, -1, tokens.shape[-1]))
            padding = padding.gather(1, safe) | (keep < 0)
            index = index[safe[:, :, None], safe[:, None, :]]
        return AdapterOutput(tokens, padding, RelativePositions(index, list(self.rel_pos_tables)))


class ToyMasker:
    """Hides random single positions (each position is its own unit)."""

    def __init__(self, options: ToyOptions) -> None:
        self.options = options

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
        units = positions.expand_as(padding_mask).clone()
        units[:, 0] = -1
        return units.masked_fill(padding_mask, -1)

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        units = self.units(batch, padding_mask)
        mask = torch.zeros_like(padding_mask)
        ratio = self.options.joint_mask_ratio if joint else self.options.mask_ratio
        for row in range(units.shape[0]):
            candidates = (units[row] >= 0).nonzero().flatten()
            count = round(ratio * len(candidates))
            if joint and single_view_mask is not None:
                # The joint view only hides what the single view showed.
                candidates = candidates[~single_view_mask[row, candidates]]
                count = min(count, len(candidates))
            order = torch.randperm(len(candidates), generator=generator)
            mask[row, candidates[order[:count]]] = True
        return mask


class ToyFFN(nn.Module):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        factory = {"device": ctx.device, "dtype": ctx.dtype}
        self.fc_in = nn.Linear(ctx.dim, ctx.ffn_dim, **factory)
        self.fc_out = nn.Linear(ctx.ffn_dim, ctx.dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(nn.functional.gelu(self.fc_in(x)))


def _build_preprocessor(options: BaseModel) -> ToyPreprocessor:
    return ToyPreprocessor(ToyOptions.model_validate(options.model_dump()))


def _build_masker(ctx: BuildContext) -> ToyMasker:
    return ToyMasker(ctx.options)  # type: ignore[arg-type]


class ToyPlugin:
    """A complete in-process modality plugin; register it with :func:`temporary_plugins` or
    ``Registry.from_plugins({"toy": ToyPlugin()})``.

    Its specs are attributes, created once (so re-registering them is a no-op); tests replace
    one (``plugin.adapter_spec = AdapterSpec(...)``) to build deliberately broken variants.
    """

    PEACE_PLUGIN_API = PLUGIN_API_VERSION

    def __init__(
        self, modality: str = "toy", *, ffn: bool = True, architecture: str | None = None
    ) -> None:
        self.modality_spec = ModalitySpec(
            name=modality,
            description="toy modality: short sequences of numbers",
            input_keys=("values", "lengths"),
            file_extensions=("toy",),
            options=ToyOptions,
        )
        self.adapter_spec = AdapterSpec(modality, ToyAdapter)
        self.ffn_spec = FFNSpec(modality, ToyFFN) if ffn else None
        self.masker_spec = MaskerSpec(modality, _build_masker)
        self.preprocessor_spec = PreprocessorSpec(modality, _build_preprocessor)
        self.architecture_spec = (
            ArchitectureSpec(
                name=architecture,
                description=f"tiny model over the {modality} modality",
                config={
                    "encoder": {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64},
                    "modalities": {modality: {}},
                },
            )
            if architecture
            else None
        )

    @hookimpl
    def peace_register_modalities(self, register: Any) -> None:
        register(self.modality_spec)

    @hookimpl
    def peace_register_adapters(self, register: Any) -> None:
        register(self.adapter_spec)

    @hookimpl
    def peace_register_ffns(self, register: Any) -> None:
        if self.ffn_spec is not None:
            register(self.ffn_spec)

    @hookimpl
    def peace_register_maskers(self, register: Any) -> None:
        register(self.masker_spec)

    @hookimpl
    def peace_register_preprocessors(self, register: Any) -> None:
        register(self.preprocessor_spec)

    @hookimpl
    def peace_register_architectures(self, register: Any) -> None:
        if self.architecture_spec is not None:
            register(self.architecture_spec)
