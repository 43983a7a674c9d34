"""Property-based fuzzing of every preprocessor, tokenizer and adapter of the ``tiny`` model.

Random and mutated file bytes (each modality's file types), arrays and tensors of random shapes,
dtypes and extreme values (NaN, inf, huge, empty dimensions), random Unicode (lone surrogates
included) and malformed collated batches. The rule each input must follow:

- it is refused with one of the library's documented errors (a ``PeaceError``, or a
  ``ValueError``/``TypeError``/``KeyError``, never an ``IndexError`` or a bare ``RuntimeError``)
  whose message names the input's modality; or
- it is accepted, and the model then embeds it into a finite embedding. Input holding NaN or inf
  is refused by the preprocessors; a collated batch with NaN, inf or overflowing values is refused
  by a model in eval mode with a ``ComponentOutputError`` naming the input key and the plugin.

Hypothesis runs derandomized (the same examples on every run) and stores no database.
Below the properties, one regression test per fault the fuzzing found.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from process_memory import peak_rss_growth

from peace_core import create_model
from peace_core.model import PeaceModel
from peace_registry.errors import ComponentOutputError, PeaceError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

#: What the library documents for bad input (IndexError, RuntimeError... are not among them).
DOCUMENTED = (PeaceError, ValueError, TypeError, KeyError)
#: Words a refusal must use to name the input of each modality.
NAMES = {"vision": ("vision", "image"), "audio": ("audio",), "text": ("text", "json")}
#: A single example taking longer than this is a hang for our purposes (all are milliseconds).
SLOW = 20.0

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: For the cheap properties (a tiny adapter or tokenizer call per example).
FUZZ_MORE = settings(FUZZ, max_examples=200)


@pytest.fixture(scope="module")
def model() -> PeaceModel:
    torch.manual_seed(0)
    return create_model("tiny").eval()


def refused_properly(modality: str, call: Callable[[], Any]) -> Any:
    """``call()``'s result, or None when it raised a documented error naming ``modality``."""
    started = time.perf_counter()
    try:
        return call()
    except DOCUMENTED as exc:
        event(f"refused: {type(exc).__name__}")
        message = str(exc)
        assert message, f"{type(exc).__name__} without a message"
        assert any(word in message.lower() for word in NAMES[modality]), (
            f"the {type(exc).__name__} does not name the {modality} input: {message}"
        )
        return None
    finally:
        assert time.perf_counter() - started < SLOW, f"{modality} input took over {SLOW} s"


def embed_sample(model: PeaceModel, modality: str, sample: dict[str, torch.Tensor]) -> None:
    """An accepted sample: finite tensors, and a finite embedding through the whole model."""
    for key, value in sample.items():
        assert isinstance(value, torch.Tensor), f"{modality} sample[{key!r}] is {type(value)}"
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{modality} preprocessing gave non-finite {key!r}"
    batch = model.preprocessor(modality).collate([sample])
    with torch.no_grad():
        embedding = model({modality: batch})[modality].embedding
    assert embedding.shape == (1, model.config.encoder.dim)
    assert torch.isfinite(embedding).all(), f"NaN {modality} embedding"
    event("embedded")


def preprocess_and_embed(model: PeaceModel, modality: str, item: Any, *, train: bool) -> None:
    pre = model.preprocessor(modality)
    sample = refused_properly(modality, lambda: pre(item, train=train))
    if sample is not None:
        embed_sample(model, modality, sample)


# --------------------------------------------------------------------------------------------
# File bytes: random, and valid files with random damage
# --------------------------------------------------------------------------------------------


def _image_file(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _audio_file(fmt: str, subtype: str, *, channels: int = 1) -> bytes:
    rng = np.random.default_rng(2)
    wave = (0.3 * rng.standard_normal((4000, channels))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, 8000, format=fmt, subtype=subtype)
    return buffer.getvalue()


SEED_FILES = {
    "vision": {
        "png": [_image_file("PNG", "RGB"), _image_file("PNG", "RGBA"), _image_file("PNG", "I;16")],
        "jpg": [_image_file("JPEG", "RGB"), _image_file("JPEG", "L")],
        "webp": [_image_file("WEBP", "RGB")],
    },
    "audio": {
        "wav": [_audio_file("WAV", "PCM_16"), _audio_file("WAV", "FLOAT", channels=2)],
        "flac": [_audio_file("FLAC", "PCM_16")],
        "ogg": [_audio_file("OGG", "VORBIS")],
    },
    "text": {
        "txt": [b"a dog on the beach\n"],
        "json": [json.dumps({"caption": ["two cats", "a sofa"], "id": 3}).encode()],
    },
}


@st.composite
def damaged(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid file with bytes overwritten (headers included), truncated or extended."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        # Early bytes are headers: sizes, rates, channel counts.
        position = position if draw(st.booleans()) else position % 64
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 4)) == 0:
        data += draw(st.binary(max_size=64))
    return bytes(data)


def file_bytes(modality: str) -> st.SearchStrategy[tuple[str, bytes]]:
    seeds = SEED_FILES[modality]
    return st.sampled_from(sorted(seeds)).flatmap(
        lambda ext: st.tuples(st.just(ext), st.one_of(st.binary(max_size=300), damaged(seeds[ext])))
    )


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_file_bytes_through_decoders_and_preprocessors(model: PeaceModel, modality: str) -> None:
    pre = model.preprocessor(modality)
    assert set(SEED_FILES[modality]) <= set(pre.decoders)

    @FUZZ
    @given(file_bytes(modality), st.booleans())
    def run(case: tuple[str, bytes], train: bool) -> None:
        ext, data = case
        decoded = refused_properly(modality, lambda: pre.decoders[ext](data))
        if decoded is not None:
            preprocess_and_embed(model, modality, decoded, train=train)
        if modality != "text":  # encoded bytes are also a raw input of their own
            preprocess_and_embed(model, modality, data, train=train)

    run()


# --------------------------------------------------------------------------------------------
# Arrays and tensors of any shape, dtype and value
# --------------------------------------------------------------------------------------------

DTYPES = [
    np.uint8,
    np.uint16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
]


@st.composite
def any_array(draw: st.DrawFn, shapes: st.SearchStrategy[tuple[int, ...]]) -> np.ndarray:
    """Any dtype and shape; ordinary values in [0, 1), one value everywhere, or a pattern of
    values over the dtype's whole range (NaN, inf, subnormals, extremes) repeated to the shape."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(shapes)
    kind = draw(st.integers(0, 3))
    if kind < 2 and dtype.kind in "fc":
        values = np.random.default_rng(draw(st.integers(0, 9))).random(shape)
        return values.astype(dtype)
    elements = hnp.from_dtype(dtype)
    if kind == 2:
        return np.full(shape, draw(elements), dtype=dtype)
    pattern = draw(hnp.arrays(dtype, draw(st.integers(1, 64)), elements=elements))
    return np.resize(pattern, shape)


#: Most elements of a generated array: the fuzzing is about kinds of input, not sizes.
MAX_ELEMENTS = 50_000


def _bounded(shape: tuple[int, ...]) -> tuple[int, ...]:
    while math.prod(shape) > MAX_ELEMENTS:
        shape = shape[:-1]
    return shape


def _shapes(*plausible: st.SearchStrategy[tuple[int, ...]], max_side: int) -> st.SearchStrategy:
    """Mostly shapes the input kind could take (empty sides included), sometimes any shape."""
    anything = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side)
    return st.one_of(*plausible, anything.map(_bounded))


SIDE = st.integers(0, 40)
IMAGE_SHAPES = _shapes(
    st.tuples(SIDE, SIDE),
    st.tuples(SIDE, SIDE, st.sampled_from([1, 2, 3, 4])),
    max_side=40,
)
TENSOR_IMAGE_SHAPES = _shapes(
    st.tuples(st.sampled_from([1, 3, 4, 5]), SIDE, SIDE), st.tuples(SIDE, SIDE), max_side=40
)


def image_items() -> st.SearchStrategy[Any]:
    pil_modes = st.tuples(
        # Float and 32-bit modes are the ones that carry extreme values: drawn more often.
        st.sampled_from(["F", "F", "I", "F", "I;16", "L", "RGB", "RGBA", "P", "1", "CMYK", "LA"]),
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=24),
        st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3e38, 255.0, 70000.0]),
    ).map(_pil_image)
    tensors = any_array(TENSOR_IMAGE_SHAPES).map(torch.from_numpy)
    return st.one_of(any_array(IMAGE_SHAPES), tensors, pil_modes)


def _pil_image(spec: tuple[str, tuple[int, int], float]) -> Image.Image:
    mode, (height, width), value = spec
    if mode == "F":
        return Image.fromarray(np.full((height, width), value, dtype=np.float32), mode="F")
    if mode == "I":
        level = int(np.clip(np.nan_to_num(value), -(2**31), 2**31 - 1))
        return Image.fromarray(np.full((height, width), level, dtype=np.int32), mode="I")
    return Image.new(mode, (width, height))


@FUZZ_MORE
@given(image_items(), st.booleans())
def test_images_of_any_shape_dtype_and_value(model: PeaceModel, item: Any, train: bool) -> None:
    event(f"input: {item.mode} image" if isinstance(item, Image.Image) else type(item).__name__)
    preprocess_and_embed(model, "vision", item, train=train)


ODD_RATES = st.one_of(
    st.sampled_from([44101, 22254, 1, 3, 384_000, 384_001, 10**9, 0, -8000]),
    st.integers(-10, 500_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([np.int64(11025), np.float32(8000.0), True, "16k", None]),
)
#: Mostly the rates of real files, sometimes anything at all.
RATES = st.integers(0, 3).flatmap(
    lambda n: ODD_RATES if n == 3 else st.sampled_from([8000, 16000, 44100, 22050, 48000])
)


FRAMES = st.integers(0, 3000)
AUDIO_SHAPES = _shapes(
    st.tuples(FRAMES),
    st.tuples(FRAMES, st.integers(1, 3)),
    st.tuples(st.integers(1, 3), FRAMES),
    max_side=300,
)


def audio_items() -> st.SearchStrategy[Any]:
    """Mostly ``(samples, rate)``; also Hugging Face style mappings and bare arrays (no rate)."""
    arrays = any_array(AUDIO_SHAPES)
    samples = st.one_of(arrays, arrays.map(torch.from_numpy))
    key = st.sampled_from(["sampling_rate", "sampling_rate", "sample_rate", "rate"])
    mapping = st.builds(lambda a, r, k: {"array": a, k: r}, samples, RATES, key)
    return st.integers(0, 5).flatmap(
        lambda n: st.tuples(samples, RATES) if n < 4 else mapping if n == 4 else samples
    )


@FUZZ_MORE
@given(audio_items(), st.booleans())
def test_audio_of_any_shape_dtype_value_and_rate(model: PeaceModel, item: Any, train: bool) -> None:
    preprocess_and_embed(model, "audio", item, train=train)


# --------------------------------------------------------------------------------------------
# Tokenizers: random Unicode through the bytes, a trained and the official tokenizer
# --------------------------------------------------------------------------------------------

#: Any code point, lone surrogates included (hypothesis leaves them out unless asked, and they
#: are 2048 of 1.1 M code points: some are put in on purpose).
UNICODE = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=()), max_size=400),
    st.tuples(st.text(max_size=50), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)).map(
        "".join
    ),
)


def _text_models() -> dict[str, Callable[[], PeaceModel]]:
    from peace_text import text_options_for, train_tokenizer

    def trained() -> PeaceModel:
        corpus = ["a dog runs on the beach", "two cats sleep on a red sofa", "日本語 🎉"] * 30
        tokenizer = train_tokenizer(corpus, 320, max_tokens=48)
        options = text_options_for(tokenizer, max_positions=64, bucket_size=16)
        return create_model("tiny", modalities=["text"], options={"text": options.model_dump()})

    def official() -> PeaceModel:
        bpe = FIXTURES / "gpt2_bpe"
        if not bpe.is_dir():
            pytest.skip(f"the official BPE files are not at {bpe}")
        options = {"vocab_size": 50264, "tokenizer": {"kind": "official", "bpe_dir": str(bpe)}}
        options |= {"max_positions": 80, "bucket_size": 16, "max_tokens": 70}
        return create_model("tiny", modalities=["text"], options={"text": options})

    return {"trained": trained, "official": official}


@pytest.mark.parametrize("tokenizer", ["bytes", "trained", "official"])
def test_random_unicode_through_every_tokenizer(model: PeaceModel, tokenizer: str) -> None:
    torch.manual_seed(0)
    text_model = model if tokenizer == "bytes" else _text_models()[tokenizer]().eval()
    pre = text_model.preprocessor("text")
    assert pre.tokenizer.kind == tokenizer
    longest = pre.options.max_tokens + 1

    @FUZZ
    @given(st.one_of(UNICODE, UNICODE.map(lambda t: t.encode("utf-8", "surrogatepass"))))
    def run(text: str | bytes) -> None:
        sample = refused_properly("text", lambda: pre(text))
        raw = text if isinstance(text, str) else text.decode("utf-8", "surrogatepass")
        valid = not any(0xD800 <= ord(c) <= 0xDFFF for c in raw)
        assert (sample is not None) == valid, (
            f"valid Unicode refused, or surrogates let in: {raw!r}"
        )
        if sample is not None:
            assert 1 <= len(sample["tokens"]) <= longest  # EOS at least, max_tokens + EOS at most
            embed_sample(text_model, "text", sample)

    run()


# --------------------------------------------------------------------------------------------
# Adapters: malformed collated batches
# --------------------------------------------------------------------------------------------

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
FILLS = [0.0, 1.0, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e30, -3e38, 1e4, 7.0, 300.0]
BATCH = st.sampled_from([1, 2, 0])


def sides(valid: list[int], odd: list[int]) -> st.SearchStrategy[int]:
    """Mostly sides an adapter accepts, sometimes ones it must refuse."""
    return st.integers(0, 5).flatmap(lambda n: st.sampled_from(odd if n == 5 else valid))


#: What each adapter reads, with sides that reach deep into it: patch multiples and the largest
#: grid (vision, tiny: 64 px), receptive field (370) and token limit (audio, tiny: 41 000 samples
#: give 1025 tokens), position and vocabulary limits (text, tiny: 130 positions, 260 ids).
PLAUSIBLE = {
    "vision": {
        "pixels": st.tuples(
            BATCH,
            sides([3], [1, 4]),
            sides([16, 32, 48, 64], [0, 15, 80]),
            sides([16, 32, 48, 64], [0, 15, 80]),
        ),
    },
    "audio": {
        "waveform": st.tuples(BATCH, sides([370, 1000, 4000], [0, 369, 41_000])),
        "lengths": st.tuples(BATCH),
    },
    "text": {
        "tokens": st.tuples(BATCH, sides([0, 1, 5, 20, 128], [129, 130])),
        "word_start": st.tuples(BATCH, sides([0, 1, 5, 20], [128])),
    },
}
#: Values each key usually holds, so that some batches pass every check of their adapter.
USUAL = {"pixels": (-2.0, 2.0), "waveform": (-3.0, 3.0), "lengths": (370, 1000), "tokens": (0, 261)}
USUAL_DTYPES = {"lengths": torch.int64, "tokens": torch.int64, "word_start": torch.bool}


@st.composite
def any_tensor(draw: st.DrawFn, shapes: st.SearchStrategy[tuple[int, ...]], key: str) -> Any:
    if draw(st.integers(0, 9)) == 9:  # now and then not a tensor at all
        return draw(st.sampled_from([None, [1, 2], "pixels", np.zeros((2, 3)), 3.5]))
    usual = USUAL_DTYPES.get(key, torch.float32)
    dtype = usual if draw(st.integers(0, 2)) < 2 else draw(st.sampled_from(TORCH_DTYPES))
    shape = list(_bounded(tuple(draw(shapes))))
    if draw(st.integers(0, 2)) == 2:  # one value everywhere, often an extreme one
        value = draw(st.sampled_from(FILLS))
        if dtype == torch.bool:
            return torch.full(shape, bool(value))
        if not (dtype.is_floating_point or dtype.is_complex):
            value = int(np.clip(np.nan_to_num(value), 0 if dtype == torch.uint8 else -5, 255))
        return torch.full(shape, value).to(dtype)
    low, high = USUAL.get(key, (0, 2))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    values = torch.rand(shape, generator=generator) * (high - low) + low
    return values.to(dtype) if dtype != torch.bool else values > (low + high) / 2


@st.composite
def malformed_batch(draw: st.DrawFn, modality: str) -> dict[str, Any]:
    """Mostly the adapter's keys with plausible shapes and any dtype or value; sometimes keys
    missing or extra, or any shape at all."""
    plausible = PLAUSIBLE[modality]
    keys = list(plausible)
    # Drawn choices lean towards 0 (hypothesis starts simple): 0 is the usual case here.
    if draw(st.integers(0, 7)) == 7:
        keys = draw(st.lists(st.sampled_from([*keys, "extra"]), unique=True, max_size=3))
    anything = st.lists(st.sampled_from([0, 1, 2, 3, 16, 64, 400]), max_size=4).map(tuple)
    batch = {}
    for key in keys:
        odd_shape = key not in plausible or draw(st.integers(0, 5)) == 5
        batch[key] = draw(any_tensor(anything if odd_shape else plausible[key], key))
    # Keep the batch consistent most of the time, so that values, not shapes, are what is tried.
    first = batch.get(keys[0]) if keys else None
    if isinstance(first, torch.Tensor) and first.ndim == 2 and draw(st.integers(0, 3)) < 3:
        size, width = first.shape
        if modality == "audio" and "lengths" in batch:
            low = min(370, width)
            lengths = torch.randint(low, width + 1, (size,), generator=torch.Generator())
            batch["lengths"] = (
                lengths.to(batch["lengths"].dtype)
                if isinstance(batch["lengths"], torch.Tensor)
                else lengths
            )
        if modality == "text" and "word_start" in batch:
            batch["word_start"] = torch.rand(size, width, generator=torch.Generator()) > 0.5
    return batch


@st.composite
def keep_positions(draw: st.DrawFn) -> Any:
    """None mostly; else a [B,K] selection, valid or not (-1 padding, out of range, wrong dtype)."""
    if draw(st.integers(0, 2)) < 2:
        return None
    rows = draw(st.lists(st.lists(st.integers(-3, 130), max_size=6), min_size=0, max_size=3))
    width = max((len(r) for r in rows), default=0)
    keep = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
    keep = keep.reshape(len(rows), width)
    return keep if draw(st.integers(0, 3)) < 3 else keep.to(draw(st.sampled_from(TORCH_DTYPES)))


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_adapters_refuse_malformed_batches_or_embed_finitely(
    model: PeaceModel, modality: str
) -> None:
    adapter = model.adapters[modality]
    assert set(PLAUSIBLE[modality]) == set(model.spec(modality).input_keys)

    @FUZZ_MORE
    @given(malformed_batch(modality), keep_positions())
    def run(batch: dict[str, Any], keep: Any) -> None:
        with torch.no_grad():
            out = refused_properly(modality, lambda: adapter(batch, keep=keep))
            if out is None:
                return
            keeps = None if keep is None else {modality: keep}
            result = refused_properly(modality, lambda: model({modality: batch}, keep=keeps))
        if result is not None:
            assert torch.isfinite(result[modality].embedding).all()

    run()


# --------------------------------------------------------------------------------------------
# Regression tests: one per fault the fuzzing found
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_images_with_nan_or_inf_are_refused(model: PeaceModel, value: float) -> None:
    # Was: Pillow 'F' images went through unchecked and gave NaN pixels, then a NaN embedding.
    from peace_vision.preprocess import ImageInputError

    image = Image.fromarray(np.full((8, 8), value, dtype=np.float32), mode="F")
    with pytest.raises(ImageInputError, match=r"<Image>: 'F' image: pixels must be finite"):
        model.preprocessor("vision")(image)


def test_empty_pil_images_are_refused(model: PeaceModel) -> None:
    # Was: a 0x0 (or 0xN) Pillow image was resized into a full image and embedded, and with
    # train=True its random crop divided by zero (ZeroDivisionError).
    from peace_vision.preprocess import ImageInputError

    for size in [(0, 0), (0, 5), (7, 0)]:
        with pytest.raises(ImageInputError, match=rf"image of size {size[0]}x{size[1]} is empty"):
            model.preprocessor("vision")(Image.new("RGB", size), train=True)


@pytest.mark.parametrize("layout", ["meta", "sparse"])
def test_meta_and_sparse_tensors_are_refused_naming_the_input(
    model: PeaceModel, layout: str
) -> None:
    # Was: NotImplementedError ("Cannot copy out of meta tensor") or numpy's sparse TypeError.
    from peace_audio.preprocess import AudioInputError
    from peace_vision.preprocess import ImageInputError

    where = "the meta device" if layout == "meta" else "the torch.sparse_coo layout"
    tensor = torch.empty(3, 8, 8, device="meta") if layout == "meta" else torch.eye(8).to_sparse()
    with pytest.raises(ImageInputError, match=f"image tensor on {where} holds no readable pixels"):
        model.preprocessor("vision")(tensor)
    with pytest.raises(AudioInputError, match=f"audio .*tensor on {where} holds no readable"):
        model.preprocessor("audio")((tensor, 8000))


def test_complex_pixels_are_refused_by_the_vision_adapter(model: PeaceModel) -> None:
    # Was: the adapter cast complex pixels to float, dropping the imaginary part with a warning.
    pixels = torch.ones(1, 3, 64, 64, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"vision pixels: expected real values, got .*complex64"):
        model.adapters["vision"]({"pixels": pixels})


@pytest.mark.parametrize(
    ("modality", "key", "value", "cause"),
    [
        ("vision", "pixels", math.nan, r"holds NaN or inf in 'pixels'"),
        ("vision", "pixels", math.inf, r"holds NaN or inf in 'pixels'"),
        ("vision", "pixels", 1e30, r"finite but reaches 1e\+30 in 'pixels'.* overflowed"),
        ("audio", "waveform", -math.inf, r"holds NaN or inf in 'waveform'"),
        ("audio", "waveform", 3e38, r"finite but reaches 3e\+38 in 'waveform'"),
    ],
)
def test_non_finite_batches_are_refused_in_eval_naming_key_and_plugin(
    model: PeaceModel, modality: str, key: str, value: float, cause: str
) -> None:
    # Was: NaN, inf or overflowing values in a collated batch gave a NaN embedding, silently.
    pre = model.preprocessor(modality)
    batch = pre.collate([pre(item) for item in pre.examples(2)])
    batch[key] = torch.full_like(batch[key], value)
    plugin = rf"the {modality} adapter from plugin '{modality}' \(peace-{modality} [\d.]+\)"
    with torch.no_grad(), pytest.raises(ComponentOutputError) as caught:
        model({modality: batch})
    message = str(caught.value)
    assert f"non-finite embedding for modality '{modality}' (eval mode)" in message
    assert re.search(f"{plugin} returned NaN or inf tokens: .*{cause}", message), message
    with torch.no_grad(), pytest.raises(ComponentOutputError, match=cause):
        model.branch(modality)({modality: batch})  # branches check the same way


def test_non_finite_weights_are_named_not_blamed_on_the_input() -> None:
    # A diverged or badly loaded model: the message points at its weights, not at the batch.
    broken = create_model("tiny", modalities=["text"]).eval()
    batch = broken.preprocess(text=["a dog on the beach"])
    with torch.no_grad():
        broken.adapters["text"].pos_embed.weight[1, 0] = math.nan
        with pytest.raises(
            ComponentOutputError,
            match=r"adapter .* own weights hold NaN or inf \(pos_embed.weight\)",
        ):
            broken(batch)
        broken.adapters["text"].pos_embed.weight[1, 0] = 0.0
        broken.encoder.blocks[1].ffn_norm.weight[0] = math.inf
        with pytest.raises(
            ComponentOutputError,
            match=r"model's own weights hold NaN or inf: blocks\.1\.ffn_norm\.weight",
        ):
            broken(batch)


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_an_empty_batch_embeds_to_nothing_with_or_without_keep(
    model: PeaceModel, modality: str
) -> None:
    # Was: with keep, the encoder could not broadcast the per-sample relative-position index of
    # an empty batch (RuntimeError "The expanded size of the tensor (1) must match ... (0)").
    pre = model.preprocessor(modality)
    batch = {key: value[:0] for key, value in pre.collate([pre(pre.examples(1)[0])]).items()}
    for keep in (None, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)):
        with torch.no_grad():
            out = model({modality: batch}, keep=None if keep is None else {modality: keep})
        result = out[modality]
        assert result.embedding.shape == (0, model.config.encoder.dim)
        assert result.hidden.shape[0] == result.padding_mask.shape[0] == 0


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_a_keep_without_any_position_is_refused(model: PeaceModel, modality: str) -> None:
    # Was: keep of shape [B, 0] gave no token at all and an IndexError reading the CLS state.
    pre = model.preprocessor(modality)
    batch = pre.collate([pre(item) for item in pre.examples(2)])
    with torch.no_grad(), pytest.raises(ValueError, match=rf"keep for modality '{modality}' sel"):
        model({modality: batch}, keep={modality: torch.zeros(2, 0, dtype=torch.long)})


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_keep_errors_name_the_modality(model: PeaceModel, modality: str) -> None:
    # Was: "keep must be a [B,K] long tensor ..." without saying whose keep; text also took
    # positions below -1 as CLS.
    pre = model.preprocessor(modality)
    batch = pre.collate([pre(item) for item in pre.examples(2)])
    adapter = model.adapters[modality]
    with pytest.raises(ValueError, match=rf"^{modality} keep must be a \["):
        adapter(batch, keep=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"^{modality} keep holds position"):
        adapter(batch, keep=torch.tensor([[0, -3], [0, 1]]))


def _flac_claiming(total_samples: int) -> bytes:
    """A short valid FLAC whose STREAMINFO claims ``total_samples`` (a 36-bit field)."""
    data = bytearray(_audio_file("FLAC", "PCM_16"))
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~((1 << 36) - 1)) | total_samples
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def test_a_flac_header_claiming_2_to_the_36_samples_is_read_as_what_it_holds(
    model: PeaceModel,
) -> None:
    # Was: soundfile.read allocated what the header claims, a MemoryError ("256 GiB") from 14 kB.
    pre = model.preprocessor("audio")
    for claim in [(1 << 36) - 1, 10**9]:
        data = _flac_claiming(claim)
        started = time.perf_counter()
        try:
            samples, rate = pre.decoders["flac"](data)
        except PeaceError as exc:
            assert "could not decode audio bytes" in str(exc)
        else:
            assert rate == 8000 and samples.ndim == 1 and len(samples) <= 4000
        assert time.perf_counter() - started < 5.0


def test_an_odd_sample_rate_is_resampled_with_bounded_memory(model: PeaceModel) -> None:
    # Was: 44101 Hz -> 8 kHz made torchaudio build an 8000-phase kernel: 250 MB and seconds per
    # clip (44101 -> 16 kHz: 2.8 GB, 44 s, 12 GB peak); 383999 Hz exhausted the machine.
    from peace_audio.preprocess import MAX_SAMPLE_RATE

    pre = model.preprocessor("audio")
    rng = np.random.default_rng(0)
    for rate in [44101, 22254, MAX_SAMPLE_RATE - 1]:
        clip = rng.standard_normal(rate * 2).astype(np.float32)
        samples: list[dict[str, torch.Tensor]] = []
        started = time.perf_counter()
        _, growth = peak_rss_growth(lambda: samples.append(pre((clip, rate))))  # noqa: B023
        assert time.perf_counter() - started < 5.0
        assert growth < 64 * 2**20, f"{rate} Hz: the peak memory rose by {growth / 2**20:.0f} MiB"
        assert samples[0]["waveform"].shape == (16000,)  # 2 s at the tiny preset's 8 kHz
        assert torch.isfinite(samples[0]["waveform"]).all()
    with pytest.raises(PeaceError, match=r"sample rate 384001 Hz is above the highest accepted"):
        pre((np.zeros(100, dtype=np.float32), MAX_SAMPLE_RATE + 1))


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (997, 1000), (1000, 997), (3, 8000)])
def test_the_bounded_resampler_is_torchaudios_filter(orig: int, new: int) -> None:
    # The per-output-sample path (used beyond the polyphase budget) computes torchaudio's sum.
    import torchaudio.functional as AF

    from peace_audio.preprocess import resample

    generator = torch.Generator().manual_seed(0)
    wave = torch.randn(20 * orig + 7, generator=generator, dtype=torch.float64)
    expected = AF.resample(wave, orig, new)
    direct = resample(wave, orig, new, polyphase_budget=0)
    assert direct.shape == expected.shape
    torch.testing.assert_close(direct, expected, atol=1e-11, rtol=0)
    # Long clips go through torchaudio in pieces (bounded memory): the same values.
    pieces = resample(wave, orig, new, chunk=3 * orig)
    torch.testing.assert_close(pieces, expected, atol=1e-12, rtol=0)


def test_finite_samples_beyond_float32_name_the_overflow(model: PeaceModel) -> None:
    with pytest.raises(PeaceError, match=r"NaN or infinite samples \(or samples beyond float32"):
        model.preprocessor("audio")((np.full(1000, 1e300), 8000))


def test_audio_lengths_of_the_wrong_dtype_say_which_dtype(model: PeaceModel) -> None:
    # Was: "'lengths' must be a [2] integer tensor ..., got (2,)": the right shape, no dtype.
    batch = {"waveform": torch.zeros(2, 8000), "lengths": torch.tensor([True, True])}
    with pytest.raises(ValueError, match=r"'lengths' must be a \[2\] integer .*got torch\.bool"):
        model.adapters["audio"](batch)


@pytest.mark.parametrize("tokenizer", ["bytes", "trained", "official"])
def test_lone_surrogates_are_refused_by_every_tokenizer(model: PeaceModel, tokenizer: str) -> None:
    # Was: UnicodeEncodeError (bytes) or "TextInputSequence must be str" TypeError (BPE).
    from peace_text.preprocess import TextInputError

    text_model = model if tokenizer == "bytes" else _text_models()[tokenizer]()
    with pytest.raises(TextInputError, match=r"lone surrogate '\\udfff' at position 1"):
        text_model.preprocessor("text")("a\udfffb")
