"""The plugin contract: every type a modality plugin produces or consumes.

This module imports neither torch nor any plugin, so that plugin entry modules stay fast to import.
Torch types appear only in annotations.

Versioning (``PLUGIN_API_VERSION``, "MAJOR.MINOR"): a plugin declares the version it was written
against as the module attribute ``PEACE_PLUGIN_API`` of its entry module. A different MAJOR means
an incompatible contract and the plugin is skipped with an error; a plugin newer in MINOR than this
library loads with a warning (it may use hooks this library does not call).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import nn

PLUGIN_API_VERSION = "1.5"

#: Modality names become checkpoint keys and ``nn.ModuleDict`` keys.
MODALITY_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

# ``nn.ModuleDict`` refuses a key that is one of its attributes ("attribute 'type' already
# exists") and a model keeps its adapters, FFNs, norms and projections in ModuleDicts by modality
# name. Listed here, not read from torch, so that discovery never imports torch; the test suite
# checks the list against the installed torch.
# fmt: off
_MODULE_DICT_ATTRIBUTES = (
    "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "clear",
    "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward",
    "get_buffer", "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "items",
    "keys", "load_state_dict", "modules", "mtia", "named_buffers", "named_children",
    "named_modules", "named_parameters", "parameters", "pop", "register_backward_hook",
    "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook",
    "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook", "register_module",
    "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook",
    "requires_grad_", "set_extra_state", "set_submodule", "share_memory", "state_dict", "to",
    "to_empty", "train", "training", "type", "update", "values", "xpu", "zero_grad",
)
# fmt: on

#: Names a modality may not take, with the reason: every torch ``nn.ModuleDict`` attribute, and
#: the parameters of ``PeaceModel.encode``/``preprocess``, which take modalities as keywords.
RESERVED_MODALITY_NAMES: Mapping[str, str] = {
    **dict.fromkeys(
        _MODULE_DICT_ATTRIBUTES,
        "an attribute of torch's nn.ModuleDict, which holds a model's modules by modality name",
    ),
    **dict.fromkeys(
        ("self", "batch_size", "progress"),
        "a parameter of PeaceModel.encode, which takes modalities as keyword arguments",
    ),
}

#: The kinds of component a plugin can register; each is keyed by a modality (or preset) name.
ComponentKind = Literal[
    "modality", "adapter", "ffn", "masker", "preprocessor", "architecture", "dataset"
]
COMPONENT_KINDS: tuple[ComponentKind, ...] = (
    "modality",
    "adapter",
    "ffn",
    "masker",
    "preprocessor",
    "architecture",
    "dataset",
)


#: Separates a modality from a variant in a component's registry name.
VARIANT_SEPARATOR = ":"


def component_name(modality: str, variant: str = "") -> str:
    """The registry name of a modality's component: ``"vision"``, or ``"vision:block"`` for the
    variant ``block``."""
    return f"{modality}{VARIANT_SEPARATOR}{variant}" if variant else modality


def component_modality(name: str) -> str:
    """The modality part of a component's registry name (``"vision:block"`` -> ``"vision"``)."""
    return name.split(VARIANT_SEPARATOR, 1)[0]


def check_modality_name(name: str, what: str = "modality") -> str:
    """Return ``name`` if it is a valid modality name, else raise ``ValueError`` saying why.
    Variant and dataset names follow the same pattern (``what`` names them in the message); only
    a modality name can be reserved (:data:`RESERVED_MODALITY_NAMES`)."""
    if not isinstance(name, str) or not MODALITY_NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid {what} name {name!r}: expected lower-case letters, digits and '_', "
            "starting with a letter (pattern ^[a-z][a-z0-9_]*$)"
        )
    if what == "modality" and name in RESERVED_MODALITY_NAMES:
        raise ValueError(
            f"invalid modality name {name!r}: it is reserved ({RESERVED_MODALITY_NAMES[name]}); "
            "choose another name"
        )
    return name


# --------------------------------------------------------------------------------------------
# What a plugin registers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalitySpec:
    """A modality: its name, what its batches hold, which files it decodes, its options.

    ``options`` is a pydantic model (``extra="forbid"``) of every per-modality setting: adapter
    shape, preprocessing and masking ratios. A model config carries one dict per modality that is
    validated against it; all fields need defaults so that ``options()`` is a working default.
    """

    name: str
    description: str
    input_keys: tuple[str, ...]
    file_extensions: tuple[str, ...]
    options: type[BaseModel]
    #: Option values for self-checks (the conformance suite, ``peace plugins check``): small sizes
    #: and nothing that needs external files, for modalities whose defaults do.
    check_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    #: Options fitted to training data (API 1.1), e.g. a tokenizer trained on the captions:
    #: ``fit_options(options, samples)`` returns the options to build with. ``peace pretrain``
    #: calls it once before it builds a fresh modality; ``samples`` is a lazy iterable of the raw
    #: training samples (webdataset dicts, extension -> bytes) of every dataset that holds the
    #: modality, read only as far as the plugin iterates. Return ``options`` unchanged when there
    #: is nothing to fit; the result must build without data (it travels in the checkpoint).
    fit_options: Callable[[BaseModel, Iterable[Mapping[str, Any]]], BaseModel] | None = field(
        default=None, hash=False
    )
    #: Option values for named architecture presets (API 1.1), e.g. ``{"tiny": {"image_size":
    #: 64}}``: a model built from the preset's name takes them for this modality, under any
    #: options its config sets. Presets hold encoder sizes; each plugin sizes its own modality.
    preset_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    #: How this modality's adapter appears in foreign checkpoint formats (API 1.2), keyed by the
    #: format's name, e.g. ``{"one-peace": ForeignAdapter("image", ...)}``. A converter (the
    #: core's handles ``"one-peace"``) maps the shared layers itself and asks each modality for
    #: its adapter's keys and options, so adapter parameter names live only in their plugin.
    foreign_adapters: Mapping[str, ForeignAdapter] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_modality_name(self.name)


@dataclass(frozen=True)
class ForeignAdapter:
    """A modality's adapter in one foreign checkpoint format (``ModalitySpec.foreign_adapters``).

    ``name`` is the modality's name in that format (ONE-PEACE calls vision ``"image"``).
    ``map_key(key)`` takes a key relative to the format's adapter prefix (ONE-PEACE:
    ``"image_adapter."``) and returns the native key relative to this plugin's adapter, or
    ``None`` for a key with no counterpart (then ``ignore`` decides whether that is expected).
    ``ignore`` is a regular expression (``re.search``) of such keys that are expected and dropped.
    ``infer_options(state, cfg)`` returns this modality's option dict from the converted adapter
    state (native keys relative to the adapter) and the checkpoint's own config mapping (``{}``
    when it has none); it raises ``ValueError`` saying what is missing when it cannot.
    """

    name: str
    map_key: Callable[[str], str | None]
    infer_options: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Mapping[str, Any]]
    ignore: str = ""


@dataclass(frozen=True)
class BuildContext:
    """Everything a per-modality factory is given when a model is built."""

    modality: str
    dim: int
    heads: int
    depth: int
    ffn_dim: int
    #: 1 when one relative-position table is shared by all layers, ``depth`` for one per layer.
    num_bias_tables: int
    options: BaseModel
    norm_eps: float = 1e-5
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None


# Adapters, FFNs, maskers and preprocessors are registered per modality. Each may also come as
# a named *variant* (API 1.2): ``MaskerSpec("vision", build, variant="block")`` registers
# ``"vision:block"``, which any plugin may provide for any modality, and a model selects it in
# its config (``variants = {vision = {masker = "block"}}``). The variant builds from the same
# ``BuildContext`` and options as the default. Two registrations of one name are still an error.


@dataclass(frozen=True)
class AdapterSpec:
    """``build(ctx)`` returns an ``nn.Module`` following the :class:`Adapter` protocol."""

    modality: str
    build: Callable[[BuildContext], nn.Module]
    #: ``""`` for the modality's default adapter; a name for a variant (API 1.2).
    variant: str = ""


@dataclass(frozen=True)
class FFNSpec:
    """``build(ctx)`` returns an ``nn.Module`` mapping ``[B,N,D] -> [B,N,D]``.

    Optional: a modality without one gets the core GeGLU + Sub-LN FFN.
    """

    modality: str
    build: Callable[[BuildContext], nn.Module]
    variant: str = ""


@dataclass(frozen=True)
class MaskerSpec:
    """``build(ctx)`` returns a :class:`Masker` for the intra-modal denoising contrast."""

    modality: str
    build: Callable[[BuildContext], Masker]
    variant: str = ""


@dataclass(frozen=True)
class PreprocessorSpec:
    """``build(options)`` returns a :class:`Preprocessor` (raw inputs -> tensors, collate)."""

    modality: str
    build: Callable[[BaseModel], Preprocessor]
    variant: str = ""


@dataclass(frozen=True)
class ArchitectureSpec:
    """A named model preset: plain data validated by ``peace_core``'s model config.

    ``config`` holds ``encoder`` (sizes) and ``modalities`` (per-modality option dicts).
    """

    name: str
    description: str
    config: Mapping[str, Any]


@dataclass(frozen=True)
class DatasetGenerator:
    """What a :class:`DatasetSpec` loads: the generator's settings and the function writing it.

    ``options`` is a pydantic model (``extra="forbid"``, every field defaulted).
    ``generate(out, options, *, overwrite=False, jobs=None)`` writes webdataset shards under
    ``out`` (``train/<kind>-NNNNNN.tar``, ``test/...``, ``prompts/<modality>.json`` for zero-shot
    classification, ``manifest.json``) and returns the manifest, whose ``datasets`` maps
    ``"<split>/<kind>"`` to ``{"count", "shards", "urls"}``. It refuses (``FileExistsError``) to
    write over another dataset unless ``overwrite``, which removes only its own files; ``jobs``
    is how many processes it may use (``None``: its choice).
    """

    options: type[BaseModel]
    generate: Callable[..., Mapping[str, Any]]


@dataclass(frozen=True)
class DatasetSpec:
    """A synthetic dataset a plugin can write (API 1.3): ``peace data synth --kind NAME OUT``.

    ``load()`` returns a :class:`DatasetGenerator`; it is called only when the dataset is made,
    so the entry module imports nothing heavy.
    """

    name: str
    description: str
    load: Callable[[], DatasetGenerator]


@dataclass
class ConvertedCheckpoint:
    """What a checkpoint converter returns: a native config + state dict and what it did."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    mapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source_format: str = ""


# --------------------------------------------------------------------------------------------
# What built components look like
# --------------------------------------------------------------------------------------------


@dataclass
class RelativePositions:
    """A modality's relative-position bias, as indices into learned tables.

    ``index`` is ``[N,N]`` (same for every sample) or ``[B,N,N]`` long bucket indices;
    ``tables`` holds 1 (shared by all layers) or ``depth`` ``nn.Embedding(rows, heads)``.
    The encoder looks up table ``l`` (or 0) per layer and places the result on the diagonal
    block of this modality's segment.
    """

    index: torch.Tensor
    tables: Sequence[nn.Embedding]


@dataclass
class AdapterOutput:
    """An adapter's output: tokens ``[B,N,D]`` (CLS first), padding mask ``[B,N]`` (True = pad)."""

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    rel_pos: RelativePositions | None = None


@runtime_checkable
class Adapter(Protocol):
    """Raw collated batch -> tokens.

    ``forward(batch, keep=None)``: ``batch`` is the modality's collated dict (keys as in
    ``ModalitySpec.input_keys``). ``keep`` (``[B,K]`` long, ``-1`` = padding) selects token
    positions to encode (the denoising student sees kept units only): embeddings, absolute
    positions and relative-position indices are gathered at those positions, so relative distances
    stay those of the original sequence. Position 0 is the CLS token.

    Optional (API 1.4), ``precompute(batch) -> batch``: the part of ``forward`` that does not
    depend on ``keep`` (a convolutional feature extractor, say), done once. Pretraining encodes
    each batch several times (unmasked, masked and joint views); when the adapter has
    ``precompute``, the objective calls it once per step and hands its result to every view's
    ``forward`` in place of the batch, so that work and its saved activations happen once. The
    result is the batch plus the adapter's own extra keys, and ``forward`` of it must equal
    ``forward`` of the batch (the conformance suite checks both, with and without ``keep``).
    """

    def __call__(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> AdapterOutput: ...


def precompute_views(adapter: object, batch: Mapping[str, torch.Tensor]) -> Mapping[str, Any]:
    """``adapter.precompute(batch)`` when the adapter defines it (API 1.4), else ``batch``."""
    precompute = getattr(adapter, "precompute", None)
    return batch if precompute is None else precompute(batch)


@runtime_checkable
class Masker(Protocol):
    """Chooses which token positions to hide for the intra-modal denoising contrast.

    Called with the modality's collated ``batch``, the adapter's ``padding_mask`` ``[B,N]`` and a
    ``torch.Generator``; returns a bool ``[B,N]`` mask (True = hidden), never True on CLS
    (position 0) or padding, deterministic for a given generator state. ``joint`` selects the
    joint-view recipe; ``single_view_mask`` is the single view's mask, for recipes that
    depend on it (e.g. a joint view hiding only what the single view showed).
    """

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        """The masking unit of every position, ``[B,N]`` long: positions sharing an id are hidden
        together (a word's BPE pieces; one id per patch or frame), ``-1`` where nothing may be
        hidden (CLS, padding, EOS). The single view hides ``round(mask_ratio * #units)`` units
        (±1), with ``mask_ratio`` read from the modality's options."""
        ...


@runtime_checkable
class Preprocessor(Protocol):
    """Raw inputs -> per-sample tensors -> collated batch.

    ``__call__(item, train=False)`` accepts the modality's raw forms (paths, bytes, PIL images,
    arrays, strings...) and returns one sample (a dict of tensors); bad input raises an error that
    names the input. ``decoders`` maps a file extension (no dot) to a function of the file's bytes
    returning something ``__call__`` accepts (webdataset decoding). ``collate`` pads and stacks
    samples into the dict an adapter reads. ``examples(count, seed)`` returns varied valid raw
    items (used by the conformance suite and smoke tests).
    """

    decoders: Mapping[str, Callable[[bytes], Any]]

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]: ...

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    def examples(self, count: int, seed: int = 0) -> list[Any]: ...


Register = Callable[[Any], None]
