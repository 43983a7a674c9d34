"""Config files (TOML/YAML/JSON), ``--set`` overrides, and readable validation errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from peace_core.config import StrictModel
from peace_core.config_io import (
    ConfigError,
    apply_overrides,
    load_config,
    model_at,
    parse_override,
    parse_yaml,
    read_config_file,
    save_config,
)


class Inner(StrictModel):
    rate: float = 0.1
    names: list[str] = Field(default_factory=list)


class Item(StrictModel):
    name: str
    weight: float = 1.0


class Outer(StrictModel):
    title: str = "run"
    inner: Inner = Field(default_factory=Inner)
    maybe: Inner | None = None
    items: list[Item] = Field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    steps: int = Field(10, gt=0)


# ---- overrides -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1", (["a"], 1)),
        ("a.b=1e-3", (["a", "b"], 0.001)),
        ("a.b=-2.5E2", (["a", "b"], -250.0)),
        ("a=true", (["a"], True)),
        ("a=null", (["a"], None)),
        ("a=", (["a"], None)),
        ("a=[vision, text]", (["a"], ["vision", "text"])),
        ("a={x: 1}", (["a"], {"x": 1})),
        ("a='007'", (["a"], "007")),
        ("a=x=y", (["a"], "x=y")),
        (" a . b =hello", (["a", "b"], "hello")),
    ],
)
def test_parse_override_reads_yaml_values(text: str, expected: tuple) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1", ".a=1"])
def test_parse_override_rejects_malformed_keys(text: str) -> None:
    with pytest.raises(ConfigError, match=r"KEY=VALUE|dotted field names"):
        parse_override(text)


def test_yaml_reads_exponent_floats_as_numbers_but_keeps_ints_and_strings() -> None:
    data = parse_yaml("a: 1e-3\nb: 5E4\nc: 10\nd: 1.5\ne: 1e\nf: '1e-3'\n")
    assert data == {"a": 0.001, "b": 50000.0, "c": 10, "d": 1.5, "e": "1e", "f": "1e-3"}
    assert isinstance(data["c"], int)


def test_apply_overrides_sets_nested_creates_tables_and_indexes_lists() -> None:
    data = {"inner": {"rate": 0.1}, "items": [{"name": "x"}, {"name": "y"}]}
    result = apply_overrides(
        data, ["inner.rate=0.5", "maybe.rate=2", "items.1.weight=3", "items.-2.name=z"]
    )
    assert result == {
        "inner": {"rate": 0.5},
        "maybe": {"rate": 2},
        "items": [{"name": "z"}, {"name": "y", "weight": 3}],
    }
    assert data == {"inner": {"rate": 0.1}, "items": [{"name": "x"}, {"name": "y"}]}  # untouched


def test_later_overrides_win() -> None:
    assert apply_overrides({}, ["a=1", "a=2"]) == {"a": 2}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.rate.x=1", r"inner.rate is a float, not a table"),
        ("items.5.name=q", r"index 5 is out of range for a list of 1 items"),
        ("items.first.name=q", r"items.first indexes a list; expected a number"),
    ],
)
def test_apply_overrides_errors_say_where(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"inner": {"rate": 0.1}, "items": [{"name": "x"}]}, [override])


# ---- files ---------------------------------------------------------------------------------

TOML = """
title = "demo"
steps = 5
[inner]
rate = 1e-3
names = ["a", "b"]
[[items]]
name = "x"
weight = 2.0
"""

YAML = """
title: demo
steps: 5
inner:
  rate: 1e-3
  names: [a, b]
items:
  - {name: x, weight: 2.0}
"""


def test_toml_yaml_and_json_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    from_toml = load_config(Outer, tmp_path / "c.toml")
    from_yaml = load_config(Outer, tmp_path / "c.yaml")
    assert from_toml == from_yaml
    assert from_toml.inner.rate == pytest.approx(0.001)
    saved = save_config(from_toml, tmp_path / "saved.json")
    assert load_config(Outer, saved) == from_toml
    saved_yaml = save_config(from_toml, tmp_path / "saved.yaml")
    assert load_config(Outer, saved_yaml) == from_toml


def test_overrides_apply_on_top_of_a_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(TOML)
    config = load_config(Outer, tmp_path / "c.toml", ["inner.names=[z]", "items.0.weight=0.5"])
    assert config.inner.names == ["z"]
    assert config.items[0].weight == 0.5
    assert config.title == "demo"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "c.ini").write_text("[a]\n")
    with pytest.raises(ConfigError, match=r"unknown suffix '.ini'; expected one of .toml"):
        read_config_file(tmp_path / "c.ini")
    (tmp_path / "bad.toml").write_text("a = [1,\n")
    with pytest.raises(ConfigError, match=r"cannot parse .*bad.toml.* as TOML"):
        read_config_file(tmp_path / "bad.toml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match=r"cannot parse .*bad.yaml.* as YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a table/mapping at the top level, got list"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match=r"cannot write a config as '.toml'"):
        save_config(Outer(), tmp_path / "out.toml")


# ---- validation messages -------------------------------------------------------------------


def test_a_typo_lists_the_valid_fields_and_the_closest() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Outer, base={"inner": {"rte": 0.2}})
    message = str(caught.value)
    assert "inner.rte: unknown field (did you mean 'rate'?)" in message
    assert "valid fields of inner: names, rate" in message


def test_a_top_level_typo_and_a_typo_inside_a_list_item() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Outer, base={"tittle": "x", "items": [{"name": "a", "wieght": 2}]})
    message = str(caught.value)
    assert "2 problems" in message
    assert (
        "tittle: unknown field (did you mean 'title'?); valid fields of the top level:" in message
    )
    assert "items.0.wieght: unknown field (did you mean 'weight'?)" in message
    assert "valid fields of items.0: name, weight" in message


def test_a_typo_inside_an_optional_model() -> None:
    with pytest.raises(ConfigError, match=r"maybe.ratez: unknown field \(did you mean 'rate'\?\)"):
        load_config(Outer, base={"maybe": {"ratez": 1}})


def test_bad_values_name_the_field_and_the_input() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Outer, base={"steps": 0, "mode": "c"})
    message = str(caught.value)
    assert "steps: Input should be greater than 0 (got 0)" in message
    assert "mode: Input should be 'a' or 'b' (got 'c')" in message


def test_model_at_follows_fields_lists_and_optionals() -> None:
    assert model_at(Outer, ()) is Outer
    assert model_at(Outer, ("inner",)) is Inner
    assert model_at(Outer, ("maybe",)) is Inner
    assert model_at(Outer, ("items", 3)) is Item
    assert model_at(Outer, ("steps",)) is None
    assert model_at(Outer, ("nothing",)) is None
