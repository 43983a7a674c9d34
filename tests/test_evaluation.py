"""Zero-shot evaluation: retrieval and classification metrics on hand-made cases, reports, and
``peace eval`` end to end on shards it has never seen."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from peace_core.cli import main
from peace_core.evaluation.classification import (
    LabelError,
    PromptFileError,
    PromptSet,
    class_embeddings,
    classification_metrics,
    confusion_matrix,
)
from peace_core.evaluation.report import loss_series, plot_loss_curves, read_metrics_jsonl
from peace_core.evaluation.retrieval import (
    RetrievalInputError,
    chance_recall,
    item_to_text_ranks,
    retrieval_from_similarity,
    retrieval_metrics,
    text_to_item_ranks,
)
from peace_core.evaluation.zero_shot import sample_captions

# ------------------------------------------------------------------------------ retrieval

# 3 items, 4 texts: item 0 owns texts 0 and 1, item 1 owns text 2, item 2 owns text 3.
OWNER = torch.tensor([0, 0, 1, 2])
SIMILARITY = torch.tensor(
    [
        [0.1, 0.9, 0.5, 0.2],  # item 0: its text 1 is the best of all -> rank 0
        [0.8, 0.1, 0.3, 0.2],  # item 1: text 0 beats its text 2 -> rank 1
        [0.7, 0.6, 0.5, 0.1],  # item 2: its text 3 is the worst -> rank 3
    ]
)


def test_ranks_on_a_hand_made_matrix() -> None:
    assert item_to_text_ranks(SIMILARITY, OWNER).tolist() == [0, 1, 3]
    # text 0 (item 0 scores 0.1; items 1, 2 score 0.8, 0.7), text 1 (0.9 best), text 2 (0.3 vs
    # 0.5, 0.5), text 3 (0.1 vs 0.2, 0.2)
    assert text_to_item_ranks(SIMILARITY, OWNER).tolist() == [2, 0, 2, 2]


def test_recall_at_k_both_directions() -> None:
    result = retrieval_from_similarity(SIMILARITY, OWNER, ks=(1, 2, 3))
    assert result.item_to_text == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3})
    assert result.text_to_item == pytest.approx({1: 1 / 4, 2: 1 / 4, 3: 1.0})
    assert result.num_items == 3 and result.num_texts == 4
    assert result.mean_recall == pytest.approx((1 / 3 + 2 / 3 + 2 / 3 + 1 / 4 + 1 / 4 + 1) / 6)
    exported = result.to_dict()
    assert exported["item_to_text"]["R@2"] == pytest.approx(2 / 3)
    assert exported["chance"]["text_to_item"]["R@1"] == pytest.approx(1 / 3)


def test_ties_count_against_the_query() -> None:
    flat = torch.zeros(3, 4)
    result = retrieval_from_similarity(flat, OWNER, ks=(1, 3))
    assert result.item_to_text[1] == 0.0 and result.text_to_item[1] == 0.0
    assert result.text_to_item[3] == 1.0  # 3 items: everything is within the top 3


def test_perfect_embeddings_retrieve_everything() -> None:
    items = torch.eye(5)
    texts = torch.cat([torch.eye(5), torch.eye(5)[:2]])  # items 0 and 1 have two captions
    owner = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    result = retrieval_metrics(items, texts, owner, ks=(1,))
    assert result.item_to_text == {1: 1.0} and result.text_to_item == {1: 1.0}


def test_chance_levels_match_the_formula_and_a_simulation() -> None:
    i2t, t2i = chance_recall(OWNER, 3, ks=(1, 2))
    # item 0 owns 2 of 4 texts: P(hit@1) = 1/2; items 1, 2: 1/4 each.
    assert i2t[1] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    assert t2i == pytest.approx({1: 1 / 3, 2: 2 / 3})
    generator = torch.Generator().manual_seed(0)
    trials = torch.rand(4000, 3, 4, generator=generator)
    hits = [item_to_text_ranks(sim, OWNER) < 2 for sim in trials]
    simulated = torch.stack(hits).float().mean()
    assert float(simulated) == pytest.approx(i2t[2], abs=0.02)


@pytest.mark.parametrize(
    ("owner", "message"),
    [
        (torch.tensor([0, 0, 1, 1]), "have no text"),  # item 2 owns nothing
        (torch.tensor([0, 1, 2, 3]), r"must lie in \[0, 3\)"),
        (torch.tensor([0, 1, 2]), "must be \\[M\\]"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer ids"),
    ],
)
def test_bad_owners_are_rejected(owner: torch.Tensor, message: str) -> None:
    with pytest.raises(RetrievalInputError, match=message):
        retrieval_from_similarity(SIMILARITY, owner)


def test_mismatched_embedding_widths_are_rejected() -> None:
    with pytest.raises(RetrievalInputError, match="width 4 but texts 3"):
        retrieval_metrics(torch.ones(2, 4), torch.ones(2, 3), [0, 1])
    with pytest.raises(RetrievalInputError, match="positive integers"):
        retrieval_from_similarity(SIMILARITY, OWNER, ks=(0,))


# ------------------------------------------------------------------------------ classification


def test_classification_accuracy_and_confusion_matrix() -> None:
    classes = ("cat", "dog", "owl")
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # cat -> cat
            [0.2, 0.7, 0.1],  # cat -> dog
            [0.1, 0.8, 0.1],  # dog -> dog
            [0.0, 0.3, 0.6],  # dog -> owl
            [0.1, 0.2, 0.7],  # dog -> owl
        ]
    )
    labels = [0, 0, 1, 1, 1]
    result = classification_metrics(logits, labels, classes)
    assert result.accuracy == pytest.approx(2 / 5)
    assert result.confusion.tolist() == [[1, 1, 0], [0, 1, 2], [0, 0, 0]]
    assert result.per_class == {"cat": pytest.approx(0.5), "dog": pytest.approx(1 / 3), "owl": None}
    assert result.top5 is None  # fewer than 5 classes
    assert result.chance == pytest.approx(1 / 3)
    exported = result.to_dict()
    assert exported["confusion_matrix"] == [[1, 1, 0], [0, 1, 2], [0, 0, 0]]


def test_top5_counts_ties_against_the_true_class() -> None:
    classes = tuple("abcdef")
    logits = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1],  # true f ranks 6th -> miss
            [6.0, 5, 4, 3, 2, 1],  # true e ranks 5th -> hit
            [1.0, 1, 1, 1, 1, 1],  # all tied: five others tie with the true class -> miss
        ]
    )
    result = classification_metrics(logits, [5, 4, 2], classes)
    assert result.top5 == pytest.approx(1 / 3)
    assert result.chance_top5 == pytest.approx(5 / 6)


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 2]), 2)


def test_class_embeddings_average_normalised_prompts() -> None:
    prompts = PromptSet(("x", "y"), ("a {}", "the {}"))
    table = {
        "a x": [2.0, 0.0, 0.0],  # normalised: [1, 0, 0]
        "the x": [0.0, 3.0, 0.0],  # normalised: [0, 1, 0]
        "a y": [0.0, 0.0, 1.0],
        "the y": [0.0, 0.0, 5.0],
    }
    seen: list[list[str]] = []

    def encode(texts: list[str]) -> torch.Tensor:
        seen.append(texts)
        return torch.tensor([table[t] for t in texts])

    result = class_embeddings(prompts, encode)
    assert seen == [["a x", "the x", "a y", "the y"]]  # one call for every prompt
    half = 2**-0.5
    assert torch.allclose(result, torch.tensor([[half, half, 0.0], [0.0, 0.0, 1.0]]))


def test_a_prompt_list_may_name_its_label_field() -> None:
    prompts = PromptSet.from_mapping({"classes": ["red", "blue"], "label_field": "colour"})
    assert prompts.label_of({"colour": "blue", "class": "red"}) == 1  # the named field only
    assert prompts.label_of({"class": "red"}) is None
    with pytest.raises(LabelError, match="json colour 'green'"):
        prompts.label_of({"colour": "green"})
    with pytest.raises(PromptFileError, match="label_field must be a non-empty string"):
        PromptSet.from_mapping({"classes": ["a"], "label_field": 3})


def test_task_names_select_the_modality() -> None:
    from peace_core.evaluation.zero_shot import EvaluationError, task_modality

    assert task_modality("vision") == "vision"
    assert task_modality("vision:colour") == "vision"
    for bad in ("vision:", ":colour", "a:b:c"):
        with pytest.raises(EvaluationError, match="MODALITY or MODALITY:NAME"):
            task_modality(bad)


def test_labels_follow_the_json_convention() -> None:
    prompts = PromptSet(("Circle", "square"))
    assert prompts.label_of({"class": "square"}) == 1
    assert prompts.label_of({"class": " circle "}) == 0  # case and spaces ignored
    assert prompts.label_of({"label": 1}) == 1
    assert prompts.label_of({"label": "Circle", "class": None}) == 0
    assert prompts.label_of({"shape": "circle"}) is None
    with pytest.raises(LabelError, match="'hexagon' is not one of"):
        prompts.label_of({"class": "hexagon"})
    with pytest.raises(LabelError, match="outside the 2 prompt classes"):
        prompts.label_of({"label": 2})
    with pytest.raises(LabelError, match="class name or index"):
        prompts.label_of({"label": True})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"classes": ["a"], "templates": ["no placeholder"]}, "must contain the placeholder"),
        ({"classes": []}, "at least one class"),
        ({"classes": ["a", "a"]}, "more than once"),
        ({"classes": ["a"], "templtes": ["{}"]}, "unknown field"),
        ({"classes": "a"}, "must be a list of strings"),
        (3, "expected an object"),
    ],
)
def test_bad_prompt_lists_are_rejected(data: object, message: str) -> None:
    with pytest.raises(PromptFileError, match=message):
        PromptSet.from_mapping(data)


def test_prompt_file_may_be_a_bare_class_list(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('["dog", "cat"]')
    prompts = PromptSet.from_file(path)
    assert prompts.classes == ("dog", "cat") and prompts.prompts("dog") == ["dog"]
    path.write_text("{not json")
    with pytest.raises(PromptFileError, match="not valid JSON"):
        PromptSet.from_file(path)


def test_captions_come_from_txt_and_json_without_repeats() -> None:
    raw = {"txt": b"A dog.\n"}
    metadata = {"captions": ["A dog.\n", "A brown dog."], "caption": "  ", "text": "Woof"}
    assert sample_captions(raw, metadata) == ["A dog.\n", "A brown dog.", "Woof"]
    assert sample_captions({}, {"caption": "only json"}) == ["only json"]
    assert sample_captions({}, {}) == []


# ------------------------------------------------------------------------------ reports


def test_loss_curves_from_a_metrics_log(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "loss": 4.0, "align:vision": 2.0, "lr": 1e-3, "dcl_acc:vision": 0.1},
        {"step": 2, "train/loss": 3.0, "dcl:text": 1.0, "lr": 2e-3},
        {"step": 3, "loss": float("nan")},
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert len(read_metrics_jsonl(log)) == 3
    series = loss_series(read_metrics_jsonl(log))
    assert set(series) == {"loss", "align:vision", "train/loss", "dcl:text"}
    assert series["loss"] == ([1.0], [4.0])  # NaN dropped
    plot_loss_curves({"stage 1": log}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.write_text('{"lr": 1}\n')
    with pytest.raises(ValueError, match="holds no loss metric"):
        plot_loss_curves({"stage 1": log}, tmp_path / "none.png")


# ------------------------------------------------------------------------------ peace eval


def _jpg(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 20, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _flac(frequency: float, seconds: float = 0.4) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * frequency * t), 16000, format="FLAC")
    return buffer.getvalue()


def _write_shards(root: Path) -> list[str]:
    """Images and sounds as a foreign dataset would write them, with a few awkward samples."""
    import webdataset

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    images = root / "images-000000.tar"
    with webdataset.TarWriter(str(images)) as sink:
        for index in range(7):
            name = list(colours)[index % 3]
            sample = {
                "__key__": f"img{index:03d}",
                "jpg": _jpg(colours[name], index),
                "txt": f"a {name} picture number {index}",
                "json": {
                    "class": name,
                    "captions": [f"something {name}"],
                    "size": ["small", "big"][index % 2],
                },
            }
            if index == 6:
                sample["json"] = {"class": "purple"}  # a class the prompts do not have
            sink.write(sample)
        sink.write({"__key__": "broken", "jpg": b"not an image", "txt": "a broken file"})
        sink.write({"__key__": "text-only", "txt": "nothing but words"})
    sounds = root / "sounds-000000.tar"
    with webdataset.TarWriter(str(sounds)) as sink:
        for index in range(4):
            sink.write(
                {
                    "__key__": f"snd{index:03d}",
                    "flac": _flac(200.0 * (1 + index % 2)),
                    "json": {
                        "caption": f"a tone of {200 * (1 + index % 2)} hertz",
                        "label": index % 2,
                    },
                }
            )
    return [str(images), str(sounds)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import peace_core

    torch.manual_seed(0)
    model = peace_core.create_model("tiny")
    return peace_core.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_peace_eval_end_to_end(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    shards = _write_shards(tmp_path)
    (tmp_path / "vision.json").write_text(
        json.dumps({"classes": ["red", "green", "blue"], "templates": ["a {} image", "{}"]})
    )
    (tmp_path / "audio.json").write_text(json.dumps({"classes": ["low", "high"]}))
    (tmp_path / "size.json").write_text(
        json.dumps({"classes": ["small", "big"], "label_field": "size"})
    )
    out = tmp_path / "report"
    code = main(
        [
            "eval",
            str(tiny_checkpoint),
            *shards,
            "--prompts",
            f"vision={tmp_path / 'vision.json'}",
            f"audio={tmp_path / 'audio.json'}",
            f"vision:size={tmp_path / 'size.json'}",
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "Zero-shot retrieval" in printed and "Zero-shot classification" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == {"vision": 7, "audio": 4}
    vision = metrics["retrieval"]["vision"]
    assert vision["items"] == 7 and vision["texts"] == 13  # txt + json caption; sample 6: txt only
    assert metrics["retrieval"]["audio"]["texts"] == 4
    for direction in ("item_to_text", "text_to_item"):
        for value in vision[direction].values():
            assert 0.0 <= value <= 1.0
    assert vision["text_to_item"]["R@10"] == 1.0  # 7 items: every one is within a text's top 10
    assert metrics["classification"]["vision"]["samples"] == 6  # "purple" is skipped
    assert metrics["classification"]["audio"]["samples"] == 4
    assert metrics["classification"]["audio"]["top5"] is None
    # A second task on the same modality, labelled by another json field: images 0..5 have one
    # ("purple" image 6 has none, so it is simply not classified there).
    assert metrics["classification"]["vision:size"]["samples"] == 6
    assert metrics["classification"]["vision:size"]["classes"] == ["small", "big"]
    assert sum(map(sum, metrics["classification"]["vision"]["confusion_matrix"])) == 6
    skipped = metrics["skipped"]["by_reason"]
    assert skipped["undecodable jpg"] == 1
    assert skipped["no item of a model modality"] == 1
    assert skipped["vision label not in prompt classes"] == 1
    names = ("confusion_vision", "confusion_vision_size", "confusion_audio", "similarity_audio")
    for name in (*names, "similarity_vision"):
        assert (out / f"{name}.png").is_file()


def test_peace_eval_embeddings_match_model_encode(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from peace_core.evaluation.zero_shot import evaluate
    from peace_core.factory import from_pretrained

    shards = _write_shards(tmp_path)
    model = from_pretrained(tiny_checkpoint).train()
    result = evaluate(model, shards[1], batch_size=3)
    assert model.training  # evaluation ran in eval mode and put the mode back
    model.eval()
    assert set(result.retrieval) == {"audio"} and not result.classification
    direct = model.encode(audio=[_flac(200.0 * (1 + i % 2)) for i in range(4)])["audio"]
    assert torch.allclose(result.data["audio"].embeddings, direct, atol=1e-5)
    captions = [f"a tone of {200 * (1 + i % 2)} hertz" for i in range(4)]
    assert result.data["audio"].captions == captions
    texts = model.encode(text=captions)["text"]
    assert torch.allclose(result.data["audio"].caption_embeddings, texts, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "vision"], "expected NAME=FILE"),
        (["--prompts", "vision=/no/such.json"], "no such file"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_peace_eval_bad_arguments_fail_in_one_line(
    tmp_path: Path, tiny_checkpoint: Path, capsys, extra: list[str], message: str
) -> None:
    shards = _write_shards(tmp_path)
    code = main(["eval", str(tiny_checkpoint), *shards, "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.count("\n") == 1


def test_peace_eval_prompts_for_a_modality_the_shards_lack(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    shards = _write_shards(tmp_path)
    (tmp_path / "audio.json").write_text('["low", "high"]')
    code = main(
        [
            "eval",
            str(tiny_checkpoint),
            shards[0],
            "--prompts",
            f"audio={tmp_path / 'audio.json'}",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 1
    assert "prompts were given for ['audio'] but the shards hold no such sample" in (
        capsys.readouterr().err
    )
