"""What users get wrong in configs: each is one line naming the file or --set, the key and
the value, raised when the config loads; the valid spellings next to them still load."""

import os

import pytest

from launcher.cli import main
from launcher.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.yaml")


def error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(str(path), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=0", "train.max_steps: expected a positive int, got 0"),
        ("train.lr=-1", "train.lr: expected a value > 0, got -1.0"),
        ("train.lr=.nan", "train.lr: expected a finite float"),
        ("train.betas=[0.9]", "train.betas: expected AdamW's two betas"),
        ("train.target_miou=70", "train.target_miou: expected a value in [0, 1], got 70.0"),
        ("train.seed=-1", "train.seed: expected a value >= 0, got -1"),
        ("data.crop_size=0", "data.crop_size: expected a positive int, got 0"),
        ("data.ignore_index=300", "data.ignore_index: expected a label value in [0, 255], got 300"),
        ("data.augment.min_scale=0", "data.augment.min_scale must be > 0"),
        ("data.synthetic.num_train=0", "data.synthetic.num_train: expected a positive int, got 0"),
        ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker: expected a positive int, got 0"),
        ("cluster.metrics_port_base=70000", "cluster.metrics_port_base: expected -1 (no exporter)"),
        ("model.decoder.num_queries=0", "model.decoder.num_queries: expected a positive int, got 0"),
        ("model.decoder.dropout=1.5", "model.decoder.dropout: expected a value in [0, 1), got 1.5"),
        ("model.backbone.out_indices=[]", "model.backbone.out_indices: expected a non-empty list, got []"),
        ("model.inference.scales=[1.0, 0]", "model.inference.scales: expected a non-empty list of values > 0"),
        ("model.pixel_mean=[1, 2]", "model.pixel_mean: expected 3 values (RGB), got [1.0, 2.0]"),
        ("model.panoptic.stuff_confidence_threshold=2", "model.panoptic.stuff_confidence_threshold: expected"),
        ("model.backbone.timm_kwargs={output_stride:8}", "write 'output_stride: 8' (YAML needs a space after ':')"),
    ],
)
def test_out_of_range_values_are_named_with_their_set(override, expected):
    message = error(DEMO, [override])
    assert message.startswith(f"--set {override}: ") and expected in message, message


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.lr=1e-4", "lr", 1e-4),
        ("train.max_steps=1e5", "max_steps", 100_000),
        ("train.max_steps=2.0e+3", "max_steps", 2000),
        ("train.run_name=0123", "run_name", "0123"),  # YAML 1.1 would read the octal 83
        ("train.run_name=2024-01-01", "run_name", "2024-01-01"),  # ... and a date
        ("train.eval_every=100000", "eval_every", 100_000),  # beyond max_steps: validation at the end only
    ],
)
def test_valid_spellings_load(override, key, value):
    assert getattr(load_config(DEMO, [override]).train, key) == value


def test_yaml_booleans_and_choices():
    cfg = load_config(DEMO, ["model.backbone.freeze_bn=yes", "model.ops.apex=off", "cluster.use_gpu=False",
                             "model.backbone.timm_kwargs={drop_path_rate: 0.1}"])
    assert cfg.model.backbone.freeze_bn is True and cfg.cluster.use_gpu is False
    assert cfg.model.ops.apex == "off"  # YAML reads a bare off as false; the key wants the word
    assert cfg.model.backbone.timm_kwargs == {"drop_path_rate": 0.1}
    # "on" is no choice of this key: the error says why a word became a boolean
    assert error(DEMO, ["model.ops.apex=on"]).endswith(
        "model.ops.apex: expected one of 'auto', 'off', got bool True (YAML reads a bare on/off/yes/no/true/false "
        "as a boolean)")


def test_file_mistakes(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  num_classes: 5\ntrain:\n  lr: 0.1\nmodel:\n  name: pft\n")
    assert error(twice) == f"{twice}: line 5: key 'model' appears twice (first on line 1); YAML would silently keep only the last"
    in_file = tmp_path / "typed.yaml"
    in_file.write_text("train:\n  run_name: 123\n")
    assert "train.run_name: expected str, got int 123 (quote it in YAML: '123')" in error(in_file)
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- train\n")
    assert "list.yaml: expected a mapping of sections (model, data, train, cluster), got list" in error(listed)
    folder_base = tmp_path / "folder_base.yaml"
    folder_base.write_text(f"base: {tmp_path}\n")
    assert error(folder_base).startswith(f"{folder_base}: base: '{tmp_path}': is a folder")


def test_a_mistake_in_a_base_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lrr: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  lr: 0.5\n")
    assert error(child).startswith(f"{tmp_path / 'base.yaml'}: train.lrr: unknown key")
    # ... a base's value mended by the child is fine, and a child's mistake names the child.
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 0\n")
    child.write_text("base: base.yaml\ntrain:\n  max_steps: 5\n  log_every: 0\n")
    assert error(child).startswith(f"{child}: train.log_every: expected a positive int")


def test_empty_sections_change_nothing(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {DEMO}\ntrain:\nmodel:\n  backbone:\n    timm_kwargs:\n")
    cfg = load_config(str(child))
    assert cfg.train.max_steps == 600 and cfg.model.backbone.timm_kwargs == {}


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["describe", "--config", DEMO, "--set", "train.grad_accum_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --set train.grad_accum_steps=0: train.grad_accum_steps: expected a positive int, "
                   "got 0\n")


@pytest.mark.parametrize(
    "argv, expected",
    [
        # the space would otherwise be reported as an unrecognized argument "0.1"
        (["train", "--config", DEMO, "--set", "train.lr", "0.1"],
         "error: argument --set: expected SECTION.KEY=VALUE in one word, got 'train.lr' (see segscale train --help)"),
        (["train", "--config", DEMO, "--bogus"], "error: unrecognized arguments: --bogus (see segscale --help)"),
        (["eval-semantic", "--pred-dir", "p"], "error: the following arguments are required: --gt-dir, --num-classes"),
    ],
)
def test_command_line_mistakes_are_one_line(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
