"""VisionAdapter: hMLP stem, 2-D relative-position buckets, position interpolation, keep, parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peace_core.rel_pos import grid_bucket_index, grid_bucket_rows
from peace_registry.contract import BuildContext
from peace_vision.adapter import EMBEDDED_KEY, HMLPStem, VisionAdapter
from peace_vision.options import VisionOptions

FIXTURE = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures" / "one_peace_parity_a"
DIM, HEADS = 32, 4


def make_adapter(tables: int = 1, seed: int = 0, **options: object) -> VisionAdapter:
    torch.manual_seed(seed)
    opts = VisionOptions(**{"image_size": 64, **options})
    ctx = BuildContext("vision", DIM, HEADS, 2, 64, tables, opts)
    return VisionAdapter(ctx).eval()


def pixels(size: int = 2, height: int = 64, width: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(size, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- relative-position buckets (spec §2.3 worked facts) ------------------------------------------


def test_grid_bucket_rows_official_size() -> None:
    assert grid_bucket_rows(16) == 964
    assert grid_bucket_rows(4) == 52


def test_grid_bucket_index_official_facts() -> None:
    index = grid_bucket_index(16, 16, 16)
    assert index.shape == (257, 257)
    assert (index[0, 1:] == 961).all()  # CLS as query: N - 3
    assert (index[1:, 0] == 962).all()  # CLS as key: N - 2
    assert index[0, 0] == 963  # CLS to itself: N - 1
    patch = index[1:, 1:]
    assert (patch.diagonal() == 15 * 31 + 15).all()  # zero offset sits at the centre
    # patch 0 is (0,0), patch 255 is (15,15): offsets -15/-15 and +15/+15
    assert index[1, 256] == 0 and index[256, 1] == 30 * 31 + 30
    # row-major order: patch 1 is (0,1), patch 16 is (1,0)
    assert index[2, 1] == 15 * 31 + 16 and index[17, 1] == 16 * 31 + 15
    assert patch.min() == 0 and patch.max() == 960


def test_adapter_index_and_tables_per_layer() -> None:
    adapter = make_adapter(tables=3)
    out = adapter({"pixels": pixels()})
    assert len(out.rel_pos.tables) == 3
    for table in out.rel_pos.tables:
        assert table.weight.shape == (52, HEADS)
        assert torch.count_nonzero(table.weight) == 0  # zero-initialised
    assert torch.equal(out.rel_pos.index, grid_bucket_index(4, 4, 4))
    assert not out.padding_mask.any() and out.padding_mask.shape == (2, 17)


# --- hMLP stem -----------------------------------------------------------------------------------


def test_hmlp_stem_has_stride_16_and_embeds_patches_independently() -> None:
    torch.manual_seed(0)
    stem = HMLPStem(DIM).eval()
    images = pixels(1, 48, 80)
    out = stem(images)
    assert out.shape == (1, DIM, 3, 5)
    changed = images.clone()
    changed[:, :, 16:32, 32:48] += 1.0  # patch (1, 2) only
    diff = (stem(changed) - out).abs().amax(dim=(0, 1))
    assert diff[1, 2] > 0
    diff[1, 2] = 0
    assert torch.count_nonzero(diff) == 0


def test_stem_shapes_and_parameter_names() -> None:
    adapter = make_adapter()
    shapes = {name: tuple(p.shape) for name, p in adapter.named_parameters()}
    assert shapes == {
        "cls_token": (1, 1, DIM),
        "pos_embed": (17, DIM),
        "stem.conv1.weight": (DIM // 4, 3, 4, 4),
        "stem.conv1.bias": (DIM // 4,),
        "stem.norm1.weight": (DIM // 4,),
        "stem.norm1.bias": (DIM // 4,),
        "stem.conv2.weight": (DIM // 4, DIM // 4, 2, 2),
        "stem.conv2.bias": (DIM // 4,),
        "stem.norm2.weight": (DIM // 4,),
        "stem.norm2.bias": (DIM // 4,),
        "stem.conv3.weight": (DIM, DIM // 4, 2, 2),
        "stem.conv3.bias": (DIM,),
        "rel_pos_tables.0.weight": (52, HEADS),
    }


def test_initialisation_follows_the_official_recipe() -> None:
    adapter = make_adapter(image_size=256)
    for param in (adapter.cls_token, adapter.pos_embed):
        assert param.abs().max() <= 0.02 and param.std() > 0.005
    for conv in (adapter.stem.conv1, adapter.stem.conv2, adapter.stem.conv3):
        assert torch.count_nonzero(conv.bias) == 0 and conv.weight.std() > 0
    assert torch.equal(adapter.stem.norm1.weight, torch.ones(DIM // 4))


def test_dim_not_divisible_by_four_is_rejected() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        HMLPStem(30)


def test_builds_on_meta_device_with_official_sizes() -> None:
    ctx = BuildContext("vision", 1536, 24, 40, 6144, 1, VisionOptions(), device="meta")
    adapter = VisionAdapter(ctx)
    assert all(p.is_meta for p in adapter.parameters())
    assert adapter.pos_embed.shape == (257, 1536)
    assert adapter.rel_pos_tables[0].weight.shape == (964, 24)
    assert sum(p.numel() for p in adapter.parameters()) == 3_390_816  # spec §4: ≈3.4 M


# --- absolute positions --------------------------------------------------------------------------


def test_native_size_adds_pos_embed_exactly() -> None:
    adapter = make_adapter()
    images = pixels()
    patches = adapter.stem(images).flatten(2).transpose(1, 2)
    expected = torch.cat([adapter.cls_token.expand(2, -1, -1), patches], dim=1) + adapter.pos_embed
    assert adapter.position_embeddings(4, 4) is adapter.pos_embed
    torch.testing.assert_close(adapter({"pixels": images}).tokens, expected, rtol=0, atol=0)


def test_other_grid_interpolates_patch_rows_and_keeps_cls() -> None:
    adapter = make_adapter(rel_bucket_size=8)
    resized = adapter.position_embeddings(8, 6)
    assert resized.shape == (1 + 48, DIM)
    assert torch.equal(resized[0], adapter.pos_embed[0])
    grid = adapter.pos_embed[1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(8, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[1:], reference.permute(0, 2, 3, 1).reshape(48, DIM))
    # a constant grid stays constant; the forward uses the resized rows
    with torch.no_grad():
        adapter.pos_embed[1:] = 0.5
    torch.testing.assert_close(adapter.position_embeddings(8, 6)[1:], torch.full((48, DIM), 0.5))
    images = pixels(1, 128, 96)
    out = adapter({"pixels": images})
    stem = adapter.stem(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens[:, 1:], stem + 0.5)
    assert torch.equal(out.rel_pos.index, grid_bucket_index(8, 6, 8))


def test_interpolation_runs_in_fp32_for_half_weights() -> None:
    adapter = make_adapter(rel_bucket_size=8).to(torch.bfloat16)
    resized = adapter.position_embeddings(6, 6)
    assert resized.dtype == torch.bfloat16
    grid = adapter.pos_embed[1:].float().reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = reference.to(torch.bfloat16).permute(0, 2, 3, 1).reshape(36, DIM)
    assert torch.equal(resized[1:], expected)


# --- input errors --------------------------------------------------------------------------------


def test_grid_larger_than_rel_bucket_is_a_clear_error() -> None:
    adapter = make_adapter()
    with pytest.raises(ValueError, match=r"larger than rel_bucket_size 4.*64x64 pixels"):
        adapter({"pixels": pixels(1, 80, 64)})


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ({"image": torch.zeros(1, 3, 64, 64)}, KeyError, "no 'pixels'"),
        ({"pixels": torch.zeros(3, 64, 64)}, ValueError, r"\[B,3,H,W\]"),
        ({"pixels": torch.zeros(1, 1, 64, 64)}, ValueError, r"\[B,3,H,W\]"),
        ({"pixels": torch.zeros(1, 3, 60, 64)}, ValueError, "multiples of 16"),
    ],
)
def test_bad_batches_are_rejected(batch: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_adapter()(batch)


# --- keep ----------------------------------------------------------------------------------------


def test_keep_equals_full_forward_at_kept_positions() -> None:
    adapter = make_adapter()
    images = pixels(3)
    full = adapter({"pixels": images})
    keep = torch.tensor([[0, 3, 7, 16], [0, 1, -1, -1], [0, 16, 2, -1]])
    kept = adapter({"pixels": images}, keep=keep)
    assert kept.tokens.shape == (3, 4, DIM)
    assert torch.equal(kept.padding_mask, keep < 0)
    for b in range(3):
        valid = keep[b][keep[b] >= 0]
        torch.testing.assert_close(kept.tokens[b, : len(valid)], full.tokens[b, valid])
        expected_index = full.rel_pos.index[valid[:, None], valid[None, :]]
        assert torch.equal(kept.rel_pos.index[b, : len(valid), : len(valid)], expected_index)
    assert torch.count_nonzero(kept.tokens[1, 2:]) == 0  # padded slots are zero
    assert kept.rel_pos.tables[0] is adapter.rel_pos_tables[0]


def test_precomputed_patches_are_used_and_checked() -> None:
    adapter = make_adapter()
    batch = {"pixels": pixels(2)}
    shared = adapter.precompute(batch)
    assert shared[EMBEDDED_KEY].shape == (2, 17, DIM)
    keep = torch.tensor([[0, 3, 16], [0, 1, -1]])
    for view in (None, keep):
        torch.testing.assert_close(
            adapter(shared, keep=view).tokens, adapter(batch, keep=view).tokens
        )
    # What forward reads is the precomputed value, not a fresh stem pass.
    assert adapter({**shared, EMBEDDED_KEY: torch.zeros(2, 17, DIM)}).tokens.abs().sum() == 0
    with pytest.raises(
        ValueError, match=r"'embedded' must be .*shape \[2, 17, 32\]; got \(2, 5, 32\)"
    ):
        adapter({**batch, EMBEDDED_KEY: torch.zeros(2, 5, DIM)})


@pytest.mark.parametrize(
    "keep",
    [
        torch.tensor([0, 1]),
        torch.tensor([[0, 1]]),  # batch of 1 for 2 images
        torch.tensor([[0, 17], [0, 1]]),
        torch.tensor([[0, -2], [0, 1]]),
        torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
    ],
)
def test_bad_keep_is_rejected(keep: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="vision keep"):
        make_adapter()({"pixels": pixels()}, keep=keep)


# --- official parity -----------------------------------------------------------------------------

_OFFICIAL_TO_OURS = {
    "embed_images.0.": "stem.conv1.",
    "embed_images.1.layer_norm.": "stem.norm1.",
    "embed_images.3.": "stem.conv2.",
    "embed_images.4.layer_norm.": "stem.norm2.",
    "embed_images.6.": "stem.conv3.",
    "cls_embedding": "cls_token",
    "pos_embed": "pos_embed",
    "rel_pos_table_list.": "rel_pos_tables.",
}


def _official_state(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "encoder_wrapper.image_adapter."
    state = {}
    for key, value in model.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        for official, ours in _OFFICIAL_TO_OURS.items():
            if key.startswith(official):
                state[ours + key[len(official) :]] = value.float()
    return state


def test_reproduces_the_official_image_adapter() -> None:
    if not (FIXTURE / "checkpoint.pt").is_file():
        pytest.skip(f"parity fixture not found at {FIXTURE}")
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", weights_only=True)["model"]
    inputs = torch.load(FIXTURE / "inputs.pt", weights_only=True)
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    # The fixture's tiny sizes (config.json): 64-px images, position grid 4, relative bucket 4.
    options = VisionOptions(image_size=64, pos_bucket_size=4, rel_bucket_size=4)
    adapter = VisionAdapter(BuildContext("vision", 64, 4, 2, 128, 1, options)).eval()
    adapter.load_state_dict(_official_state(checkpoint), strict=True)
    with torch.no_grad():
        out = adapter({"pixels": inputs["image"]})
    reference = expected["image_adapter_out"]
    assert out.tokens.shape == reference.shape == (3, 17, 64)
    torch.testing.assert_close(out.tokens, reference, rtol=0, atol=1e-5)
    stored_buckets = checkpoint["encoder_wrapper.image_adapter.rp_bucket"]
    assert torch.equal(out.rel_pos.index, stored_buckets)
    assert torch.equal(out.padding_mask, expected["image_padding_mask"])
