"""Behaviour of the imu modality beyond the conformance suite."""

from __future__ import annotations

import io
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peace_core import create_model, from_pretrained, save_pretrained
from peace_registry import BuildContext, get_registry
from pydantic import ValidationError

from peace_imu.adapter import ImuAdapter
from peace_imu.masking import ImuSpanMasker, span_mask
from peace_imu.options import CHANNELS, ImuOptions
from peace_imu.preprocess import ImuInputError, ImuPreprocessor, decode_bytes

torch.set_num_threads(1)

#: Small windows: 50 Hz, patches of 5 samples (0.1 s), at most 2 s (20 patches).
OPTIONS = ImuOptions(max_seconds=2.0, patch_size=5)
SCALES = np.asarray(OPTIONS.channel_scales)


def window(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, 6)) * 3


def csv_bytes(data: np.ndarray, times: np.ndarray | None = None, header: str = "") -> bytes:
    columns = header or ",".join(([] if times is None else ["t"]) + list(CHANNELS))
    table = data if times is None else np.concatenate([times[:, None], data], axis=1)
    rows = [",".join(repr(float(v)) for v in row) for row in table]
    return ("\n".join([columns, *rows]) + "\n").encode()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def dominant_frequency(signal: np.ndarray, rate: float) -> float:
    spectrum = np.abs(np.fft.rfft(signal - signal.mean()))
    return float(np.fft.rfftfreq(signal.shape[0], 1 / rate)[spectrum.argmax()])


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def test_entry_module_is_cheap_and_registered_through_the_entry_point() -> None:
    code = (
        "import sys, peace_imu.plugin; "
        "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]; "
        "assert not heavy, f'imported {heavy}'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [record] = [r for r in get_registry().plugins() if r.entry == "peace_imu.plugin"]
    assert record.status == "ok" and record.dist == "peace-imu"
    spec = get_registry().modality("imu")
    assert spec.options is ImuOptions and spec.file_extensions == ("npy", "csv")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_default_options_and_their_derived_sizes() -> None:
    options = ImuOptions()
    assert (options.sample_rate, options.source_rate, options.patch_size) == (50, 50, 10)
    assert (options.max_patches, options.max_samples) == (50, 500)
    assert ImuOptions(max_seconds=0.3, sample_rate=10, patch_size=1).max_samples == 3


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_seconds": 0.1}, "fewer than one patch"),
        ({"max_seconds": 300.0}, "at most 1023"),
        ({"channel_scales": [1, 1, 1, 1, 1, 0]}, "gz=0"),
        ({"channel_scales": [1, 1, 1]}, "channel_scales"),
        ({"mask_rate": 0.5}, "mask_rate"),
    ],
)
def test_invalid_options_are_rejected(fields: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(words)):
        ImuOptions(**fields)


# --------------------------------------------------------------------------------------------
# Preprocessing: input forms
# --------------------------------------------------------------------------------------------


def test_every_input_form_gives_the_same_sample(tmp_path: Path) -> None:
    data = window(23)  # 23 samples at 50 Hz: 4 whole patches of 5, 3 samples dropped
    np.save(tmp_path / "w.npy", data)
    (tmp_path / "w.csv").write_bytes(csv_bytes(data))
    (tmp_path / "t.csv").write_bytes(csv_bytes(data, np.arange(23) / 50 + 7.0))
    pre = ImuPreprocessor(OPTIONS)
    expected = pre(data)
    assert expected["imu"].dtype == torch.float32 and int(expected["lengths"]) == 20
    np.testing.assert_allclose(expected["imu"].numpy(), data[:20] / SCALES, rtol=1e-6)
    forms = {
        "tensor": torch.from_numpy(data),
        "float32 tensor": torch.from_numpy(data).float(),
        "dict with rate": {"data": data, "rate": 50},
        "dict without rate": {"data": torch.from_numpy(data)},
        "dict with timestamps": {"data": data, "t": np.arange(23) / 50},
        "dict of lists": {"data": data.tolist(), "t": (np.arange(23) / 50).tolist()},
        "npy path": str(tmp_path / "w.npy"),
        "npy Path": tmp_path / "w.npy",
        "csv path": str(tmp_path / "w.csv"),
        "csv path with t": tmp_path / "t.csv",
        "npy bytes": npy_bytes(data),
        "csv bytes": csv_bytes(data),
        "csv bytearray": bytearray(csv_bytes(data)),
        "npy decoder": pre.decoders["npy"](npy_bytes(data)),
        "csv decoder": pre.decoders["csv"](csv_bytes(data)),
        "csv decoder with t": pre.decoders["csv"](csv_bytes(data, np.arange(23) / 50)),
    }
    for form, item in forms.items():
        sample = pre(item)
        assert sample.keys() == expected.keys(), form
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-6, msg=form)


def test_csv_columns_may_come_in_any_order_and_case_with_blank_lines() -> None:
    data = window(10)
    order = [5, 0, 3, 1, 4, 2]
    header = ", ".join(CHANNELS[i].upper() for i in order)
    shuffled = csv_bytes(data[:, order], header=header).replace(b"\n", b"\n\n", 1)
    decoded = decode_bytes(shuffled)
    assert decoded.keys() == {"data"}
    np.testing.assert_array_equal(decoded["data"], data)


def test_rates_and_timestamps_are_read_from_where_they_are_given() -> None:
    data = window(40)
    pre = ImuPreprocessor(ImuOptions(max_seconds=2.0, patch_size=5, source_rate=100))
    assert int(pre(data)["lengths"]) == 20  # 40 samples at the source rate 100 Hz: 0.39 s
    assert int(pre({"data": data, "rate": 25})["lengths"]) == 75  # 1.56 s at 50 Hz
    assert int(pre(csv_bytes(data))["lengths"]) == 20  # CSV without t: the source rate
    times = np.arange(40) * 0.04  # 25 Hz, from the CSV's t column
    assert int(pre(csv_bytes(data, times))["lengths"]) == 75


# --------------------------------------------------------------------------------------------
# Resampling, cropping, patches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [100.0, 200.0, 25.0, 37.5])
def test_resampling_keeps_the_frequency_of_a_sine(rate: float) -> None:
    options = ImuOptions(max_seconds=10.0, patch_size=5)
    times = np.arange(int(8 * rate)) / rate  # 8 s
    data = np.zeros((times.shape[0], 6))
    data[:, 0] = np.sin(2 * np.pi * 3.0 * times)  # 3 Hz
    data[:, 4] = np.cos(2 * np.pi * 1.5 * times)  # 1.5 Hz
    sample = ImuPreprocessor(options)({"data": data, "rate": rate})["imu"].numpy() * SCALES
    assert dominant_frequency(sample[:, 0], 50.0) == pytest.approx(3.0, abs=0.13)
    assert dominant_frequency(sample[:, 4], 50.0) == pytest.approx(1.5, abs=0.13)
    grid = np.arange(sample.shape[0]) / 50.0
    # Linear interpolation is close to the true curve (exact at the shared instants).
    tolerance = 0.05 if rate >= 50 else 0.2
    np.testing.assert_allclose(sample[:, 0], np.sin(2 * np.pi * 3.0 * grid), atol=tolerance)
    # Grid points up to the last input sample (8 s minus one source step), whole patches only.
    last = (times.shape[0] - 1) / rate
    assert sample.shape[0] == (math.floor(last * 50 + 1e-9) + 1) // 5 * 5


def test_irregular_timestamps_are_interpolated_onto_the_model_grid() -> None:
    rng = np.random.default_rng(3)
    times = 2.5 + np.cumsum(rng.uniform(0.005, 0.02, 150))  # ~80 Hz, jittered, not from 0
    data = np.zeros((150, 6))
    data[:, 2] = 9.81 + np.sin(2 * np.pi * 2.0 * times)
    out = ImuPreprocessor(OPTIONS)(csv_bytes(data, times))["imu"].numpy()[:, 2] * SCALES[2]
    grid = times[0] + np.arange(out.shape[0]) / 50.0
    np.testing.assert_allclose(out, 9.81 + np.sin(2 * np.pi * 2.0 * grid), atol=0.01)
    assert (out.shape[0] // 5) * 5 == out.shape[0] and grid[-1] <= times[-1]


def test_long_windows_are_centre_cropped_or_randomly_cropped_in_training() -> None:
    data = np.arange(300, dtype=np.float64)[:, None].repeat(6, axis=1)  # 6 s at 50 Hz
    pre = ImuPreprocessor(OPTIONS)  # at most 100 samples
    first = (pre(data)["imu"][:, 0] * SCALES[0]).numpy()
    np.testing.assert_allclose(first, np.arange(100, 200), rtol=1e-6)  # the centre
    starts = set()
    for seed in range(8):
        random.seed(seed)  # training crops draw from Python's RNG (the pipeline seeds it)
        cropped = (pre(data, train=True)["imu"][:, 0] * SCALES[0]).numpy()
        assert cropped.shape == (100,) and np.allclose(np.diff(cropped), 1.0, atol=1e-3)
        starts.add(round(float(cropped[0])))
    assert len(starts) > 1 and min(starts) >= 0 and max(starts) <= 200


def test_channels_are_divided_by_fixed_scales_not_by_statistics() -> None:
    data = np.tile([9.80665, 0.0, -9.80665, math.pi, 0.0, -math.pi / 2], (10, 1))
    sample = ImuPreprocessor(OPTIONS)(data)["imu"]
    torch.testing.assert_close(sample[0], torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0, -0.5]))
    custom = ImuPreprocessor(ImuOptions(patch_size=5, channel_scales=(1, 2, 3, 4, 5, 6)))
    torch.testing.assert_close(
        custom(np.ones((10, 6)))["imu"][0], 1 / torch.arange(1.0, 7.0), rtol=1e-6, atol=0
    )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _bad_csv(text: str) -> bytes:
    return text.encode()


BAD_INPUTS = [
    ("1-D", np.zeros(6), ImuInputError, ["imu array", "1 dimension(s)", "[T, 6]"]),
    ("3-D", np.zeros((2, 10, 6)), ImuInputError, ["3 dimension(s)"]),
    ("3 channels", np.zeros((20, 3)), ImuInputError, ["3 channel(s)", "(20, 3)", "gx, gy, gz"]),
    ("transposed", np.zeros((6, 40)), ImuInputError, ["40 channel(s)", "transposed", "array.T"]),
    (
        "transposed tensor",
        torch.zeros(6, 40),
        ImuInputError,
        ["imu tensor", "transposed", "array.T"],
    ),
    ("NaN", np.where(np.eye(20, 6) > 0, np.nan, 0.0), ImuInputError, ["NaN or inf", "sample 0"]),
    (
        "inf",
        {"data": np.pad(np.full((1, 6), np.inf), ((4, 15), (0, 0)))},
        ImuInputError,
        ["imu dict", "6 non-finite", "sample 4, column 'ax'"],
    ),
    ("empty", np.zeros((0, 6)), ImuInputError, ["imu array is empty", "0 samples"]),
    ("shorter than a patch", np.zeros((4, 6)), ImuInputError, ["4 sample(s)", "one patch of 5"]),
    (
        "shorter than a patch after resampling",
        {"data": np.zeros((8, 6)), "rate": 100},
        ImuInputError,
        ["imu dict", "4 sample(s) at 50 Hz", "one patch"],
    ),
    ("strings", np.array([["a"] * 6] * 8), ImuInputError, ["dtype <U1", "real numbers"]),
    (
        "unknown CSV column",
        _bad_csv("t,ax,ay,az,gx,gy,gz,mx\n0,0,0,0,0,0,0,0\n"),
        ImuInputError,
        ["imu bytes", "unknown CSV column(s) ['mx']", "ax, ay, az, gx, gy, gz and optionally t"],
    ),
    (
        "missing CSV column",
        _bad_csv("ax,ay,az,gx,gy\n0,0,0,0,0\n"),
        ImuInputError,
        ["missing CSV column(s) ['gz']"],
    ),
    (
        "repeated CSV column",
        _bad_csv("ax,ay,az,gx,gy,gz,ax\n" + "0," * 6 + "0\n"),
        ImuInputError,
        ["['ax'] appear more than once"],
    ),
    ("CSV without rows", _bad_csv("ax,ay,az,gx,gy,gz\n"), ImuInputError, ["is empty"]),
    ("blank CSV", _bad_csv("\n \n"), ImuInputError, ["is empty", "header row"]),
    (
        "CSV with a bad number",
        _bad_csv("ax,ay,az,gx,gy,gz\n0,0,0,0,0,0\n0,0,x,0,0,0\n"),
        ImuInputError,
        ["line 3, column 'az': 'x' is not a number"],
    ),
    (
        "CSV with a short row",
        _bad_csv("ax,ay,az,gx,gy,gz\n0,0,0\n"),
        ImuInputError,
        ["line 2 has 3 fields, the header has 6"],
    ),
    (
        "non-increasing CSV timestamps",
        _bad_csv("t,ax,ay,az,gx,gy,gz\n" + "".join(f"{t},0,0,0,0,0,0\n" for t in [0, 1, 1, 2])),
        ImuInputError,
        ["do not increase strictly", "t[2] = 1 s follows t[1] = 1 s"],
    ),
    (
        "decreasing dict timestamps",
        {"data": np.zeros((3, 6)), "t": np.array([0.0, 0.2, 0.1])},
        ImuInputError,
        ["imu dict timestamps do not increase strictly", "t[2] = 0.1 s"],
    ),
    (
        "timestamps of the wrong length",
        {"data": np.zeros((3, 6)), "t": np.array([0.0, 0.2])},
        ImuInputError,
        ["3 samples but timestamps of shape (2,)"],
    ),
    (
        "rate and timestamps",
        {"data": np.zeros((3, 6)), "t": np.arange(3.0), "rate": 5},
        ImuInputError,
        ["at most one of 'rate' (Hz) or 't'"],
    ),
    (
        "unknown dict key",
        {"data": np.zeros((30, 6)), "hz": 50},
        ImuInputError,
        ["keys ['data', 'hz']"],
    ),
    (
        "ragged rows",
        {"data": [[0.0] * 6, [0.0] * 5]},
        ImuInputError,
        ["imu dict 'data' is not a rectangular table"],
    ),
    ("zero rate", {"data": np.zeros((30, 6)), "rate": 0}, ImuInputError, ["rate 0", "positive"]),
    ("bad bytes", b"\xff\xfe\xfa", ImuInputError, ["neither a .npy array nor UTF-8 CSV"]),
    ("truncated npy", npy_bytes(np.zeros((10, 6)))[:60], ImuInputError, ["not a readable .npy"]),
    ("CSV text as str", "ax,ay,az,gx,gy,gz\n1,2,3,4,5,6\n", ImuInputError, ["text.encode()"]),
    ("unknown suffix", "walk.txt", ImuInputError, ["'walk.txt'", "expected a .npy or .csv"]),
    ("missing file", "no/such/walk.csv", FileNotFoundError, ["walk.csv"]),
    ("list", [[0.0] * 6] * 10, TypeError, ["of type list", "[T, 6]"]),
    ("object", object(), TypeError, ["of type object"]),
]


@pytest.mark.parametrize(
    ("item", "error", "words"),
    [pytest.param(item, error, words, id=name) for name, item, error, words in BAD_INPUTS],
)
def test_bad_input_raises_an_error_naming_it(item: object, error: type, words: list[str]) -> None:
    with pytest.raises(error) as raised:
        ImuPreprocessor(OPTIONS)(item)
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {str(raised.value)!r}"


def test_input_errors_are_value_errors_and_name_files(tmp_path: Path) -> None:
    assert issubclass(ImuInputError, ValueError)
    path = tmp_path / "walk.csv"
    path.write_text("ax,ay,az,gx,gy\n0,0,0,0,0\n")
    with pytest.raises(ImuInputError, match=re.escape(f"imu file {str(path)!r}: missing")):
        ImuPreprocessor(OPTIONS)(path)
    np.save(tmp_path / "walk.npy", np.zeros((6, 50)))
    with pytest.raises(ImuInputError, match=r"walk\.npy' has 50 channel.*transposed"):
        ImuPreprocessor(OPTIONS)(tmp_path / "walk.npy")


# --------------------------------------------------------------------------------------------
# Collate, adapter, keep
# --------------------------------------------------------------------------------------------


def test_collate_pads_to_the_longest_and_the_adapter_marks_padding_and_honours_keep() -> None:
    pre = ImuPreprocessor(OPTIONS)
    batch = pre.collate([pre(window(17)), pre(window(5, seed=1))])  # 3 patches and 1 patch
    assert batch["imu"].shape == (2, 15, 6) and batch["lengths"].tolist() == [15, 5]
    assert not batch["imu"][1, 5:].any()
    adapter = ImuAdapter(BuildContext("imu", 16, 4, 2, 32, 1, OPTIONS)).eval()
    out = adapter(batch)
    assert out.tokens.shape == (2, 4, 16) and out.tokens.dtype == torch.float32
    assert out.padding_mask.tolist() == [[False] * 4, [False, False, True, True]]
    keep = torch.tensor([[0, 1, 3], [0, 1, -1]])
    kept = adapter(batch, keep=keep)
    assert torch.equal(kept.tokens[0], out.tokens[0, [0, 1, 3]])
    assert torch.equal(kept.tokens[1, :2], out.tokens[1, :2])
    assert kept.padding_mask.tolist() == [[False] * 3, [False, False, True]]
    assert torch.equal(kept.rel_pos.index[0], out.rel_pos.index[[0, 1, 3]][:, [0, 1, 3]])
    # A window alone gives the tokens it gives in a padded batch.
    alone = adapter(pre.collate([pre(window(5, seed=1))]))
    torch.testing.assert_close(alone.tokens[0], out.tokens[1, :2])


def test_adapter_emits_tokens_in_its_parameters_dtype_and_rejects_bad_batches() -> None:
    pre = ImuPreprocessor(OPTIONS)
    batch = pre.collate([pre(window(20))])
    ctx = BuildContext("imu", 16, 4, 2, 32, 2, OPTIONS, dtype=torch.bfloat16)
    out = ImuAdapter(ctx)(batch)
    assert out.tokens.dtype == torch.bfloat16 and len(out.rel_pos.tables) == 2
    adapter = ImuAdapter(BuildContext("imu", 16, 4, 2, 32, 1, OPTIONS))
    with pytest.raises(ValueError, match="multiple of patch_size 5"):
        adapter({"imu": torch.zeros(1, 12, 6), "lengths": torch.tensor([12])})
    with pytest.raises(ValueError, match="longer than max_patches 20"):
        adapter({"imu": torch.zeros(1, 105, 6), "lengths": torch.tensor([105])})
    with pytest.raises(KeyError, match="lengths"):
        adapter({"imu": torch.zeros(1, 10, 6)})


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


def runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a 1-D bool tensor."""
    lengths, current = [], 0
    for value in [*mask.tolist(), False]:
        if value:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths


@pytest.mark.parametrize(("patches", "hidden", "span"), [(50, 24, 3), (40, 20, 4), (9, 5, 3)])
def test_span_masks_are_contiguous_spans_of_the_exact_count(
    patches: int, hidden: int, span: int
) -> None:
    for seed in range(20):
        mask = span_mask(patches, hidden, span, generator=torch.Generator().manual_seed(seed))
        lengths = runs(mask)
        assert sum(lengths) == hidden
        assert len(lengths) <= math.ceil(hidden / span)
        if hidden % span == 0:  # whole spans only: every run is one or more spans
            assert all(length % span == 0 for length in lengths), lengths


def test_span_mask_edge_cases() -> None:
    generator = torch.Generator().manual_seed(0)
    assert not span_mask(5, 0, 3, generator=generator).any()
    assert span_mask(5, 5, 3, generator=generator).all()
    assert span_mask(1, 1, 4, generator=generator).tolist() == [True]
    # Spans are placed all over the window, not only at its start.
    starts = set()
    for seed in range(30):
        mask = span_mask(30, 3, 3, generator=torch.Generator().manual_seed(seed))
        starts.add(int(mask.nonzero()[0]))
    assert len(starts) > 10


def test_masker_hides_spans_at_each_ratio_never_cls_or_padding_deterministically() -> None:
    options = ImuOptions(max_seconds=2.0, patch_size=5, mask_ratio=0.5, joint_mask_ratio=0.25)
    padding = torch.tensor([[False] * 21, [False] * 9 + [True] * 12])  # 20 and 8 patches
    masker = ImuSpanMasker(options)
    units = masker.units({}, padding)
    assert units[0].tolist() == [-1, *range(20)] and units[1, 9:].eq(-1).all()
    mask = masker({}, padding, generator=torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [10, 4]
    assert not (mask[:, 0] | (mask & padding).any(dim=1)).any()
    assert len(runs(mask[0])) <= 4  # ceil(10 / 3) spans
    again = masker({}, padding, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    single = mask.clone()
    joint = masker(
        {}, padding, generator=torch.Generator().manual_seed(1), joint=True, single_view_mask=mask
    )
    assert joint.sum(dim=1).tolist() == [5, 2] and torch.equal(mask, single)
    assert not torch.equal(mask, masker({}, padding, generator=torch.Generator().manual_seed(5))), (
        "another seed should give another mask"
    )


# --------------------------------------------------------------------------------------------
# A model
# --------------------------------------------------------------------------------------------


def test_examples_vary_in_kind_length_and_rate() -> None:
    pre = ImuPreprocessor(OPTIONS)
    items = pre.examples(12, seed=3)
    kinds = {type(item).__name__ for item in items}
    assert {"ndarray", "dict", "bytes", "Tensor"} <= kinds
    lengths = {int(pre(item)["lengths"]) for item in items}
    assert len(lengths) > 4 and max(lengths) <= OPTIONS.max_samples
    assert any(isinstance(item, dict) and item["rate"] != 50 for item in items)
    assert any(isinstance(item, bytes) and item.startswith(b"t,") for item in items)


def test_a_model_with_text_and_imu_embeds_windows_and_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", modalities=["text", "imu"])  # the preset's options for imu
    assert model.options["imu"].max_seconds == 4.0
    items = model.preprocessor("imu").examples(3, seed=1)
    embeddings = model.encode(imu=items, text=["walking", "running upstairs"])
    imu, text = embeddings["imu"], embeddings["text"]
    assert imu.shape == (3, model.config.encoder.dim) and torch.isfinite(imu).all()
    assert text.shape == (2, model.config.encoder.dim)
    torch.testing.assert_close(imu.norm(dim=-1), torch.ones(3))
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "imu.safetensors"))
    assert reloaded.options["imu"] == model.options["imu"]
    again = reloaded.encode(imu=items, text=["walking", "running upstairs"])
    torch.testing.assert_close(again["imu"], imu)
    torch.testing.assert_close(again["text"], text)
