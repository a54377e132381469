"""The demo regenerates its dataset when the settings change, and reuses it otherwise."""

import os

from launcher.config import load_config
from launcher.demo import ensure_synthetic_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reuse_and_regenerate(tmp_path, capsys):
    def cfg(num_train, per_shard=4):
        return load_config(os.path.join(REPO, "configs", "demo.yaml"), [
            f"data.train_manifest={tmp_path}/train-manifest.json", f"data.val_manifest={tmp_path}/val-manifest.json",
            f"data.synthetic.num_train={num_train}", "data.synthetic.num_val=3",
            f"data.synthetic.samples_per_shard={per_shard}"])

    ensure_synthetic_data(cfg(6))
    assert capsys.readouterr().out.count("generated") == 2
    ensure_synthetic_data(cfg(6))
    assert capsys.readouterr().out.count("reusing") == 2
    ensure_synthetic_data(cfg(9))  # more samples: train regenerated, val reused
    out = capsys.readouterr().out
    assert "generated 9 train samples into 3 shards" in out and "reusing 3 val" in out
    ensure_synthetic_data(cfg(9, per_shard=5))  # other shard size: train re-sharded; val's single shard holds
    out = capsys.readouterr().out
    assert "generated 9 train samples into 2 shards" in out and "reusing 3 val" in out


def test_other_datasets_shards_are_left_alone(tmp_path):
    # `demo --config` of a preset whose manifest is named train-manifest.json (Cityscapes):
    # regenerating would delete the user's shards, so the demo refuses before writing.
    import json

    import pytest

    from launcher.config import ConfigError

    def cfg():
        return load_config(os.path.join(REPO, "configs", "demo.yaml"), [
            f"data.train_manifest={tmp_path}/train-manifest.json", f"data.val_manifest={tmp_path}/val-manifest.json",
            "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.samples_per_shard=4"])

    ensure_synthetic_data(cfg())
    manifest = tmp_path / "train-manifest.json"
    data = json.loads(manifest.read_text())
    data["format"], data["source"] = "cityscapes", {}
    manifest.write_text(json.dumps(data))
    shards = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"^data\.train_manifest: .* lists cityscapes shards"):
        ensure_synthetic_data(cfg())
    assert json.loads(manifest.read_text())["format"] == "cityscapes"
    assert sorted(p.name for p in tmp_path.iterdir()) == shards


def test_class_count_is_checked_before_generating(tmp_path):
    import pytest

    from launcher.config import ConfigError

    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"), [
        f"data.train_manifest={tmp_path}/train-manifest.json", f"data.val_manifest={tmp_path}/val-manifest.json",
        "data.synthetic.num_classes=3"])
    with pytest.raises(ConfigError, match=r"^model\.num_classes: 5, but data\.synthetic\.num_classes is 3; set both$"):
        ensure_synthetic_data(cfg)
    assert list(tmp_path.iterdir()) == []
