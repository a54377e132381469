"""Typed config: YAML presets load, overrides apply, bad keys/types are one-line errors."""

import dataclasses
import glob
import os
import re
import typing

import pytest
import yaml

from launcher.config import ConfigError, RunConfig, load_config
from launcher.typed_config import from_dict, parse_override, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps > 0 and cfg.model.num_classes > 0


def test_demo_values_and_overrides():
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"),
                      ["train.max_steps=7", "model.decoder.dropout=0.2", "data.synthetic.num_val=3",
                       "train.lr=2e-4", "model.backbone.out_indices=[0, 1]"])
    assert cfg.model.num_classes == 5 and cfg.model.backbone.name == "test_resnet"
    assert cfg.train.max_steps == 7
    assert cfg.model.decoder.dropout == 0.2
    assert cfg.data.synthetic.num_val == 3
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.backbone.out_indices == [0, 1]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.lrr=0.1", ["train.lrr", "unknown key", "did you mean 'lr'"]),
        ("train.max_steps=abc", ["train.max_steps", "expected int", "str"]),
        ("train.max_steps=1.5", ["train.max_steps", "expected int", "float"]),
        ("model.backbone.grad_checkpointing=3", ["model.backbone.grad_checkpointing", "expected bool"]),
        ("train.precision=fp8", ["train.precision", "one of 'bf16', 'fp16', 'fp32'"]),
        ("model.backbone.out_indices=[1, x]", ["model.backbone.out_indices[1]", "expected int"]),
        ("model.decoder=5", ["model.decoder", "expected a mapping"]),
        ("nosection.key=1", ["nosection", "unknown key"]),
    ],
)
def test_bad_override_is_one_line_error_naming_key(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(os.path.join(REPO, "configs", "demo.yaml"), [override])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--set {override}: ")  # the override is at fault, not the file
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_key_in_file_and_base_chain(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  max_steps: 11\n  lr: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(str(child))
    assert cfg.train.max_steps == 11 and cfg.train.lr == 0.25

    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base.yaml\nmodel:\n  backbone:\n    nmae: resnet50\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.backbone.nmae: unknown key \(did you mean 'name'"):
        load_config(str(bad))


def test_a_file_at_fault_is_named_even_with_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.max_stpes: unknown key"):
        load_config(str(bad), ["train.lr=0.1"])
    # ... and an override may mend the file's bad value; a later bad one is then named.
    bad.write_text("train:\n  max_steps: abc\n")
    assert load_config(str(bad), ["train.max_steps=5"]).train.max_steps == 5
    with pytest.raises(ConfigError, match=r"^--set train.lr=x: train.lr: expected float"):
        load_config(str(bad), ["train.max_steps=5", "train.lr=x"])
    # An override mended by a later one is not blamed for another's error.
    with pytest.raises(ConfigError, match=r"^--set train.lr=x: train.lr"):
        load_config(os.path.join(REPO, "configs", "demo.yaml"),
                    ["train.max_steps=abc", "train.max_steps=5", "train.lr=x"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    child = tmp_path / "child.yaml"
    child.write_text("base: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base: 'nothere.yaml': config file not found \(.*nothere.yaml"):
        load_config(str(child))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a folder; expected a YAML config file"):
        load_config(str(tmp_path))
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xff" * 10)
    with pytest.raises(ConfigError, match="weights.yaml: not a text file"):
        load_config(str(binary))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("train.max_steps")


def test_round_trip_through_dict():
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"))
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg


def _config_keys(cls, prefix=""):
    """``{"train.lr": 0.0001, ...}``: every leaf key of a config dataclass and its default."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(_config_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return keys


def test_readme_lists_every_config_key_with_its_default():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### Config keys"):readme.index("## Running on a Ray cluster")]
    rows = re.findall(r"^\| `([a-z_0-9.]+)` \| `([^`]*)` \|", section, flags=re.M)
    documented = {}
    for key, cell in rows:
        low_high = re.fullmatch(r"\[(\d+)\.\.(\d+)\]", cell)  # a long list written as its range
        documented[key] = list(range(int(low_high[1]), int(low_high[2]) + 1)) if low_high else yaml.safe_load(cell)
    keys = _config_keys(RunConfig)
    assert sorted(set(keys) - set(documented)) == [], "config keys missing from README's Config keys"
    assert sorted(set(documented) - set(keys)) == [], "README lists keys that do not exist"
    wrong = {k: (documented[k], v) for k, v in keys.items() if documented[k] != v}
    assert wrong == {}, "README default (documented, actual)"
    # Keys named anywhere else in the README exist too (a renamed key leaves no stale mention).
    mentioned = set(re.findall(r"`(?:--set )?((?:model|data|train|cluster)\.[a-z_0-9.]+)(?:[=` ])", readme))
    sections = {k.rsplit(".", 1)[0] for k in keys}
    assert sorted(m for m in mentioned if m not in keys and m not in sections) == []
