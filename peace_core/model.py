"""The model users hold: adapters + shared fusion encoder + per-modality heads, and its branches.

``PeaceModel`` owns every module and the build context of each modality: the rest of the library
asks the model (``masker``, ``preprocessor``, ``spec``), never the registry. ``model.branch("a")``
or ``model.branch("a", "b")`` returns a :class:`Branch`: a plain ``nn.Module`` that *shares* (never
copies) the shared attention and only the named modalities' adapters, FFNs, final norms and
projections, so a branch kept alone holds only the memory it needs. Branches are built once per
set of modalities and cached; the model's own forward runs its modules directly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import nn

from peace_core.config import ModelConfig
from peace_core.encoder import FusionEncoder, Segment
from peace_core.gemm import Linear
from peace_core.init import init_fusion_weights
from peace_core.layers import GeGLUFFN
from peace_registry import BuildContext, Masker, ModalitySpec, Registry, get_registry
from peace_registry.contract import AdapterOutput, Preprocessor, RelativePositions, component_name
from peace_registry.errors import (
    ComponentBuildError,
    ComponentOutputError,
    PeaceError,
    describe_plugin,
)

#: What a plugin factory may raise that says nothing about the plugin: re-raised as it is.
_NOT_THE_PLUGINS_FAULT = (MemoryError, torch.OutOfMemoryError)


class ModelConfigError(PeaceError, ValueError):
    """A model configuration that cannot be built."""


@dataclass
class ModalityOutput:
    """One modality's result: final hidden states (CLS first), padding mask, retrieval embedding."""

    hidden: torch.Tensor
    padding_mask: torch.Tensor
    embedding: torch.Tensor


def _validate_options(registry: Registry, modality: str, raw: Mapping[str, Any]) -> BaseModel:
    spec = registry.modality(modality)
    try:
        return spec.options.model_validate(dict(raw))
    except ValidationError as err:
        raise ModelConfigError(f"invalid options for modality {modality!r}: {err}") from err


class Branch(nn.Module):
    """A model restricted to some modalities; shares its parameters with the parent model.

    ``forward(batch)`` takes ``{modality: collated batch}`` and returns ``{modality:
    ModalityOutput}``. With several modalities present and ``joint=True`` (the default for a
    multi-modality branch) they run as ONE fused sequence, in the order ``batch`` lists them
    (ONE-PEACE puts text first); otherwise each runs alone. ``keep`` optionally selects token
    positions per modality (the denoising student's view).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        adapters: nn.ModuleDict,
        encoder: FusionEncoder,
        projections: nn.ModuleDict,
        logit_scale: nn.Parameter,
        adapter_origins: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.adapters = adapters
        self.encoder = encoder
        self.projections = projections
        self.logit_scale = logit_scale
        #: ``{modality: "the <modality> adapter from plugin ..."}``: how errors name an adapter.
        self.adapter_origins = dict(adapter_origins or {})

    def embed(self, modality: str, hidden: torch.Tensor) -> torch.Tensor:
        """CLS (already through the final modality LN) -> projection -> L2 normalisation."""
        return embed(self.projections, modality, hidden)

    def forward(
        self,
        batch: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        joint: bool | None = None,
        keep: Mapping[str, torch.Tensor] | None = None,
        hidden_grad: bool = True,
    ) -> dict[str, ModalityOutput]:
        return _run(self, batch, joint=joint, keep=keep, hidden_grad=hidden_grad)


def embed(projections: nn.ModuleDict, modality: str, hidden: torch.Tensor) -> torch.Tensor:
    """A modality's retrieval embedding: its CLS state, projected, L2-normalised."""
    return F.normalize(projections[modality](hidden[:, 0]), dim=-1)


def _run(
    owner: Branch | PeaceModel,
    batch: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    joint: bool | None,
    keep: Mapping[str, torch.Tensor] | None,
    hidden_grad: bool = True,
) -> dict[str, ModalityOutput]:
    """The forward of a branch or a whole model: adapters -> fusion encoder -> embeddings.

    The encoder routes each segment to its modality's FFN, so a whole model runs any subset of its
    modalities without building a branch. Each adapter's output is checked (type, shape, dtype,
    device) and a fault raises :class:`ComponentOutputError` naming its plugin. In eval mode the
    hidden states and embeddings must also be finite: a NaN or inf raises the same error, saying
    which input held non-finite or out-of-range values, instead of returning a NaN embedding. In
    training mode that check is left to the trainer's non-finite-loss check, so that a training
    forward adds no host-device synchronisation.
    """
    kind = "branch" if isinstance(owner, Branch) else "model"
    unknown = sorted(set(batch) - set(owner.modalities))
    if unknown:
        raise KeyError(
            f"batch holds modalities {unknown} that this {kind} does not have; "
            f"{kind} modalities: {list(owner.modalities)}"
        )
    present = list(batch)
    if not present:
        raise ValueError(f"empty batch: expected some of {list(owner.modalities)}")
    joint = len(present) > 1 if joint is None else joint
    # Eval mode is the adapters' (shared), not the owner's: a cached branch is no child of its
    # model, so model.eval() does not reach the branch object itself.
    check_finite = not torch.compiler.is_compiling()
    results: dict[str, ModalityOutput] = {}
    for names in [present] if joint else [[name] for name in present]:
        segments = []
        for name in names:
            kept = None if keep is None else keep.get(name)
            if isinstance(kept, torch.Tensor) and kept.ndim == 2 and kept.shape[1] == 0:
                raise ValueError(
                    f"keep for modality {name!r} selects no position (shape "
                    f"{tuple(kept.shape)}): a kept view holds at least CLS, position 0"
                )
            out = owner.adapters[name](batch[name], keep=kept)
            _check_adapter_output(owner, name, out)
            segments.append(Segment(name, out.tokens, out.padding_mask, out.rel_pos))
        if all(segment.tokens.shape[0] == 0 for segment in segments):
            # No samples, nothing to encode (and the encoder cannot broadcast a per-sample
            # relative-position index of an empty batch): empty results of the right shapes.
            for segment in segments:
                tokens = segment.tokens
                empty = tokens.new_zeros(0, tokens.shape[-1])
                results[segment.modality] = ModalityOutput(
                    tokens.new_zeros(tokens.shape), segment.padding_mask, empty
                )
            continue
        output = owner.encoder(segments, first_rows_grad_only=not hidden_grad)
        for name, hidden, mask in zip(names, output.hidden, output.padding_mask):
            embedding = embed(owner.projections, name, hidden)
            if not hidden_grad:
                hidden = hidden.detach()
            evaluating = check_finite and not owner.adapters[name].training
            if evaluating and not hidden.is_meta and not _all_finite(hidden, embedding):
                raise _non_finite_error(owner, name, batch, segments)
            results[name] = ModalityOutput(hidden, mask, embedding)
    return results


def _origin(owner: Branch | PeaceModel, modality: str) -> str:
    return owner.adapter_origins.get(modality, f"the {modality} adapter")


def _check_adapter_output(owner: Branch | PeaceModel, modality: str, out: object) -> None:
    """What the fusion encoder needs from an adapter; anything else names the plugin at fault."""
    what = _origin(owner, modality)
    if not isinstance(out, AdapterOutput):
        raise ComponentOutputError(
            f"{what} returned {type(out).__name__}; expected an AdapterOutput(tokens, "
            "padding_mask, rel_pos)"
        )
    dim = owner.encoder.config.dim
    reference = owner.projections[modality].weight
    tokens, padding = out.tokens, out.padding_mask
    # The model's dtype, or autocast's compute dtype under autocast. A sharded (DTensor)
    # parameter's own dtype and device are not what the encoder computes in: not checked then.
    plain = type(reference) is nn.Parameter
    device_type = tokens.device.type if isinstance(tokens, torch.Tensor) else "cpu"
    dtypes = [reference.dtype] if plain else []
    if torch.is_autocast_enabled(device_type):
        dtypes.append(torch.get_autocast_dtype(device_type))
    names = " or ".join(str(d) for d in dict.fromkeys(dtypes))
    where = f" on {reference.device}" if plain else ""
    whose = "the model's dtype and device" + (", or autocast's dtype" if len(dtypes) > 1 else "")
    expected = f"[B, N >= 1, {dim}] floating-point tokens" + (
        f" in {names}{where} ({whose})" if dtypes else ""
    )
    if not isinstance(tokens, torch.Tensor):
        raise ComponentOutputError(
            f"{what} returned tokens of type {type(tokens).__name__}; expected {expected}"
        )
    wrong = (
        tokens.ndim != 3
        or tokens.shape[1] == 0  # not even CLS, whose state is the embedding
        or tokens.shape[-1] != dim
        or not tokens.is_floating_point()
        or (dtypes and tokens.dtype not in dtypes)
        or (plain and tokens.device != reference.device)
    )
    if wrong:
        raise ComponentOutputError(
            f"{what} returned tokens of shape {tuple(tokens.shape)}, {tokens.dtype} on "
            f"{tokens.device}; expected {expected}"
        )
    if (
        not isinstance(padding, torch.Tensor)
        or padding.dtype != torch.bool
        or padding.shape != tokens.shape[:2]
    ):
        got = (
            f"{padding.dtype} of shape {tuple(padding.shape)}"
            if isinstance(padding, torch.Tensor)
            else type(padding).__name__
        )
        raise ComponentOutputError(
            f"{what} returned a padding_mask {got}; expected bool of shape "
            f"{tuple(tokens.shape[:2])} (the tokens' [B, N], True at padding)"
        )
    if out.rel_pos is not None and not isinstance(out.rel_pos, RelativePositions):
        raise ComponentOutputError(
            f"{what} returned rel_pos of type {type(out.rel_pos).__name__}; expected "
            "RelativePositions(index, tables) or None"
        )


def _all_finite(*tensors: torch.Tensor) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _non_finite_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]


def _non_finite_error(
    owner: Branch | PeaceModel,
    modality: str,
    batch: Mapping[str, Mapping[str, torch.Tensor]],
    segments: Sequence[Segment],
) -> ComponentOutputError:
    """Say where a non-finite result came from: weights that are not finite, an adapter's tokens
    (and which of its inputs were not finite or far out of range), or the fusion encoder
    overflowing on finite tokens. Runs only once the result is known to be bad."""
    head = f"non-finite embedding for modality {modality!r} (eval mode): "
    culprits = [s for s in segments if not bool(torch.isfinite(s.tokens).all())]
    if not culprits:
        shared = _non_finite_parameters(owner.encoder) + [
            f"projections.{modality}.{name}"
            for name in _non_finite_parameters(owner.projections[modality])
        ]
        if shared:
            return ComponentOutputError(
                head + f"the model's own weights hold NaN or inf: {', '.join(shared[:5])}"
            )
        largest = max(
            float(s.tokens.detach().abs().amax()) if s.tokens.numel() else 0.0 for s in segments
        )
        return ComponentOutputError(
            head + f"the fusion encoder overflowed on finite tokens (largest magnitude "
            f"{largest:.3g}) of "
            + ", ".join(_origin(owner, s.modality) for s in segments)
            + "; tokens that large overflow the attention: the adapter should normalise them"
        )
    parts = []
    for segment in culprits:
        inputs = batch[segment.modality]
        weights = _non_finite_parameters(owner.adapters[segment.modality])
        bad = [
            key
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ]
        sizes = {
            key: float(value.detach().abs().amax())
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()
        }
        key = max(sizes, key=sizes.__getitem__, default=None)
        if weights:
            cause = f"its own weights hold NaN or inf ({', '.join(weights[:5])})"
        elif bad:
            cause = f"its batch holds NaN or inf in {', '.join(map(repr, bad))}"
        elif key is not None:
            cause = (
                f"its batch is finite but reaches {sizes[key]:.3g} in {key!r}, far outside what "
                "the modality's preprocessor produces, and the adapter's arithmetic overflowed"
            )
        else:
            cause = "from a finite batch: a fault of the adapter itself"
        parts.append(f"{_origin(owner, segment.modality)} returned NaN or inf tokens: {cause}")
    return ComponentOutputError(
        head
        + "; ".join(parts)
        + ". Pass finite inputs within the preprocessor's range (its output always is)"
    )


def _share_encoder_subset(encoder: FusionEncoder, modalities: Sequence[str]) -> FusionEncoder:
    """A new encoder object whose blocks share the shared layers and only ``modalities``' FFNs."""
    view = copy.copy(encoder)
    view._modules = dict(encoder._modules)
    blocks = []
    for block in encoder.blocks:
        shared = copy.copy(block)
        shared._modules = dict(block._modules)
        shared._modules["ffns"] = nn.ModuleDict({m: block.ffns[m] for m in modalities})
        blocks.append(shared)
    view._modules["blocks"] = nn.ModuleList(blocks)
    view._modules["final_norms"] = nn.ModuleDict({m: encoder.final_norms[m] for m in modalities})
    return view


class PeaceModel(nn.Module):
    """Adapters, fusion encoder, final norms and projections for the configured modalities."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        registry: Registry | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        registry = registry or get_registry()
        if not config.modalities:
            raise ModelConfigError(
                "a model needs at least one modality; available: "
                + ", ".join(registry.modalities())
            )
        self.config = config
        self._registry = registry
        enc = config.encoder
        self.options: dict[str, BaseModel] = {
            name: _validate_options(registry, name, raw) for name, raw in config.modalities.items()
        }
        self.contexts: dict[str, BuildContext] = {
            name: BuildContext(
                modality=name,
                dim=enc.dim,
                heads=enc.heads,
                depth=enc.depth,
                ffn_dim=enc.ffn_dim,
                num_bias_tables=enc.num_bias_tables,
                options=options,
                norm_eps=enc.norm_eps,
                device=device,
                dtype=dtype,
            )
            for name, options in self.options.items()
        }
        contexts = self.contexts
        for name, chosen in config.variants.items():
            for kind, variant in chosen.items():  # unknown variants fail before anything is built
                getattr(registry, kind)(name, variant)
        #: ``{modality: "the <modality> adapter from plugin ..."}``: how errors name an adapter.
        self.adapter_origins = {name: self.describe_component("adapter", name) for name in contexts}
        self.adapters = nn.ModuleDict(
            {name: self._build("adapter", name, ctx) for name, ctx in contexts.items()}
        )
        self.encoder = FusionEncoder(
            enc,
            {name: self._ffn_factory(name, ctx) for name, ctx in contexts.items()},
            device=device,
            dtype=dtype,
        )
        self.projections = nn.ModuleDict(
            {name: Linear(enc.dim, enc.dim, device=device, dtype=dtype) for name in contexts}
        )
        init_fusion_weights(self.projections, enc.init)
        self.logit_scale = nn.Parameter(
            torch.tensor(config.logit_scale_init, device=device, dtype=dtype or torch.float32)
        )
        self._preprocessors: dict[str, Any] = {}
        self._maskers: dict[str, Masker] = {}
        self._branches: dict[tuple[str, ...], tuple[tuple[int, ...], Branch]] = {}

    def _spec(self, kind: str, modality: str) -> Any:
        """The registered ``kind`` component of ``modality``, in the variant the config picks."""
        variant = self.config.variants.get(modality, {}).get(kind)
        return getattr(self._registry, kind)(modality, variant)

    def describe_component(self, kind: str, modality: str) -> str:
        """How errors name a component: ``the vision adapter from plugin 'vision' (peace-vision
        0.1.0)``, or ``the vision masker variant 'block' from plugin ...``."""
        variant = self.config.variants.get(modality, {}).get(kind)
        record = self._registry.component_record(kind, component_name(modality, variant or ""))
        part = f"{kind} variant {variant!r}" if variant else kind
        origin = describe_plugin(record.plugin, record.dist, record.version)
        return f"the {modality} {part} from {origin}"

    def _build(self, kind: str, modality: str, argument: Any) -> Any:
        """Build ``modality``'s ``kind`` with its plugin's factory. A factory that raises, or
        returns the wrong kind of object, is a :class:`ComponentBuildError` naming the plugin."""
        spec = self._spec(kind, modality)
        try:
            component = spec.build(argument)
        except _NOT_THE_PLUGINS_FAULT:
            raise
        except Exception as exc:
            what = self.describe_component(kind, modality)
            raise ComponentBuildError(
                f"{what} failed to build: {type(exc).__name__}: {exc}"
            ) from exc
        expected = {
            "adapter": (nn.Module, "an nn.Module"),
            "ffn": (nn.Module, "an nn.Module"),
            "masker": (Masker, "a Masker (callable, with units())"),
            "preprocessor": (Preprocessor, "a Preprocessor (callable, with decoders, collate)"),
        }[kind]
        if not isinstance(component, expected[0]):
            raise ComponentBuildError(
                f"{self.describe_component(kind, modality)} returned "
                f"{type(component).__name__} from its factory; expected {expected[1]}"
            )
        return component

    def _ffn_factory(self, name: str, ctx: BuildContext):
        if self._spec("ffn", name) is not None:
            return lambda: self._build("ffn", name, ctx)
        return lambda: GeGLUFFN(
            ctx.dim, ctx.ffn_dim, eps=ctx.norm_eps, device=ctx.device, dtype=ctx.dtype
        )

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.adapters.keys())

    def branch(self, *modalities: str) -> Branch:
        """A module over the shared layers and only ``modalities`` (all when none are named).

        Built once per set of modalities and cached: it shares the model's modules, so it follows
        the model through ``.to()``, training and loading; it is rebuilt when a submodule of the
        model was replaced (e.g. wrapped for sharding).
        """
        names = tuple(modalities) or self.modalities
        for name in names:
            self._check_modality(name)
        structure = self._branch_structure()
        cached = self._branches.get(names)
        if cached is None or cached[0] != structure:
            branch = Branch(
                names,
                nn.ModuleDict({name: self.adapters[name] for name in names}),
                _share_encoder_subset(self.encoder, names),
                nn.ModuleDict({name: self.projections[name] for name in names}),
                self.logit_scale,
                {name: self.adapter_origins[name] for name in names},
            )
            self._branches[names] = cached = (structure, branch)
        return cached[1]

    def _branch_structure(self) -> tuple[int, ...]:
        """Identities of the modules a branch copies references of (the encoder's and each
        block's children, FFNs, norms, adapters, projections): what a stale branch would miss."""
        encoder = self.encoder
        parts: list[Any] = [*encoder._modules.values(), *encoder.final_norms.values()]
        for block in encoder.blocks:
            parts += [block, *block._modules.values(), *block.ffns.values()]
        parts += [*self.adapters.values(), *self.projections.values()]
        return tuple(map(id, parts))

    def forward(
        self,
        batch: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        joint: bool | None = None,
        keep: Mapping[str, torch.Tensor] | None = None,
        hidden_grad: bool = True,
    ) -> dict[str, ModalityOutput]:
        """Encode ``{modality: collated batch}``; several modalities run fused (``joint``, the
        default for more than one) in the order ``batch`` lists them, or each alone.

        ``hidden_grad=False``: only the embeddings carry a gradient and the hidden states come
        back detached (e.g. as targets), which spares the last block's backward over every
        position but CLS; the values are the same."""
        return _run(self, batch, joint=joint, keep=keep, hidden_grad=hidden_grad)

    def _check_modality(self, modality: str) -> None:
        if modality not in self.options:
            raise KeyError(
                f"model has no modality {modality!r}; it was built with {list(self.modalities)}"
            )

    # ---------------------------------------------------------------- what the model was built of

    def spec(self, modality: str) -> ModalitySpec:
        """The plugin's description of ``modality``: input keys, file extensions, options."""
        self._check_modality(modality)
        return self._registry.modality(modality)

    def masker(self, modality: str) -> Masker:
        """The modality's denoising masker (the config's variant), built once."""
        self._check_modality(modality)
        if modality not in self._maskers:
            # Masks are drawn on the host from a generator: never on the model's build device.
            ctx = dataclasses.replace(self.contexts[modality], device=None, dtype=None)
            self._maskers[modality] = self._build("masker", modality, ctx)
        return self._maskers[modality]

    # ---------------------------------------------------------------- preprocessing & embedding

    def preprocessor(self, modality: str):
        """The modality's preprocessor (the config's variant), built once from its options."""
        self._check_modality(modality)
        if modality not in self._preprocessors:
            self._preprocessors[modality] = self._build(
                "preprocessor", modality, self.options[modality]
            )
        return self._preprocessors[modality]

    def preprocess(self, **inputs: Sequence[Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Raw inputs per modality (paths, images, arrays, strings...) -> a collated batch."""
        batch = {}
        for modality, items in inputs.items():
            pre = self.preprocessor(modality)
            batch[modality] = pre.collate([pre(item) for item in _as_list(modality, items)])
        return batch

    @torch.no_grad()
    def encode(
        self,
        *,
        batch_size: int = 32,
        progress: bool | None = None,
        **inputs: Sequence[Any],
    ) -> dict[str, torch.Tensor]:
        """Raw inputs per modality -> L2-normalised embeddings ``[N, D]`` (float32, on CPU).

        Each modality is encoded on its own (the retrieval layout of the official model).
        """
        from tqdm.auto import tqdm

        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        results: dict[str, torch.Tensor] = {}
        try:
            for modality, raw_items in inputs.items():
                items = _as_list(modality, raw_items)
                branch = self.branch(modality)
                pre = self.preprocessor(modality)
                chunks = []
                starts = range(0, len(items), batch_size)
                show = progress if progress is not None else len(items) > batch_size
                for start in tqdm(starts, desc=f"encode {modality}", disable=not show):
                    samples = [pre(item) for item in items[start : start + batch_size]]
                    collated = _to_device(pre.collate(samples), device)
                    chunks.append(branch({modality: collated})[modality].embedding.float().cpu())
                dim = self.config.encoder.dim
                results[modality] = torch.cat(chunks) if chunks else torch.empty(0, dim)
        finally:
            self.train(was_training)
        return results


def compose(
    *embeddings: torch.Tensor, weights: Sequence[float] | None = None, mode: str = "mean"
) -> torch.Tensor:
    """Combine L2-normalised embeddings of several modalities into one query (renormalised).

    ``mode="sum"`` adds them, ``"mean"`` averages them (same direction; kept for readability), with
    optional per-embedding ``weights``.
    """
    if not embeddings:
        raise ValueError("compose needs at least one embedding")
    if mode not in ("mean", "sum"):
        raise ValueError(f"mode must be 'mean' or 'sum', got {mode!r}")
    shapes = {tuple(e.shape) for e in embeddings}
    if len(shapes) != 1:
        raise ValueError(f"embeddings to compose must share a shape, got {sorted(shapes)}")
    weights = list(weights) if weights is not None else [1.0] * len(embeddings)
    if len(weights) != len(embeddings):
        raise ValueError(f"got {len(weights)} weights for {len(embeddings)} embeddings")
    total = sum(w * F.normalize(e, dim=-1) for w, e in zip(weights, embeddings))
    if mode == "mean":
        total = total / sum(weights)
    return F.normalize(total, dim=-1)


def _as_list(modality: str, items: Any) -> list[Any]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(
            f"{modality}= expects a list of inputs (e.g. {modality}=[...]), "
            f"got {type(items).__name__}"
        )
    return list(items)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
