"""The inference commands' handling of bad input (eval, predict, export): one line naming
the file or key at fault, checked before any long work, and nothing half-written left."""

import json
import os

import pytest
import torch
from torch import nn

from data_pipeline.loader_io import ShardReadError
from launcher import cli, predict
from launcher.checkpoint import META_FILE, CheckpointError, _list_files, resolve_checkpoint
from launcher.commands import load_weights_into
from launcher.config import load_config
from launcher.export import export_weights
from launcher.predict_record import RECORD_FILE, clear_previous
from ops.atomic_file import write_json_atomic

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def fake_checkpoint(root, name="checkpoint_a", state=None, model_config=None, weights: bytes | None = None):
    """A one-rank ZeRO-1 checkpoint as the train loop leaves it, holding ``state``."""
    directory = os.path.join(root, name)
    path = os.path.join(directory, "deepspeed", "state", "mp_rank_00_model_states.pt")
    os.makedirs(os.path.dirname(path))
    if weights is None:
        torch.save({"module": state if state is not None else nn.Linear(4, 6).state_dict()}, path)
    else:
        with open(path, "wb") as f:
            f.write(weights)
    write_json_atomic(os.path.join(directory, "files_rank_0.json"), _list_files(directory))
    write_json_atomic(os.path.join(directory, META_FILE), {"step": 7, "world_size": 1, "zero_stage": 1,
                                                            "config": {"model": model_config or {"num_classes": 5}}})
    return directory


def test_checkpoint_paths_that_hold_no_checkpoint_say_why(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(CheckpointError, match="results.json: is a file; expected a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "results.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no checkpoint here: .* no checkpoint_\* folders in it \(a run that has not saved one yet\?\)"):
        resolve_checkpoint(str(tmp_path / "empty"))
    # Rank 0 died before writing the metadata: the folder is a checkpoint, an incomplete one.
    half = fake_checkpoint(tmp_path / "run", "checkpoint_b")
    os.remove(os.path.join(half, META_FILE))
    with pytest.raises(CheckpointError, match=f"checkpoint_b: incomplete checkpoint, {META_FILE} is missing"):
        resolve_checkpoint(half)
    # A run whose only checkpoint is cut short names that checkpoint's problem.
    cut = fake_checkpoint(tmp_path / "run2")
    with open(os.path.join(cut, "deepspeed", "state", "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"run2: no verified checkpoint .*1 checkpoint folder, the newest: "
                                              r".*mp_rank_00_model_states.pt is missing or truncated"):
        resolve_checkpoint(str(tmp_path / "run2"))


def test_weights_of_another_config_name_the_tensor_and_the_setting(tmp_path):
    directory = fake_checkpoint(tmp_path)
    cfg = load_config(DEMO, ["model.num_classes=4"])
    with pytest.raises(CheckpointError, match=r"weight is \[6, 4\] in the checkpoint, \[5, 4\] here; "
                                              r"2 mismatched tensors\); settings unlike the checkpoint's: "
                                              r"model.num_classes=4 \(checkpoint: 5\)"):
        load_weights_into(nn.Linear(4, 5), directory, cfg, "demo.yaml")
    # Nothing chose another model: the checkpoint's own config builds other shapes, so the
    # model code changed; the --config hint would point the wrong way.
    with pytest.raises(CheckpointError) as err:
        load_weights_into(nn.Linear(4, 5), directory, cfg)
    assert "of the checkpoint's own config" in str(err.value) and "model code differs" in str(err.value)
    assert "without --config" not in str(err.value)
    model = nn.Linear(4, 6)
    load_weights_into(model, directory, cfg, "demo.yaml")  # fits: loaded, whatever the config says
    assert torch.equal(model.weight, torch.load(os.path.join(directory, "deepspeed", "state",
                                                             "mp_rank_00_model_states.pt"))["module"]["weight"])


def test_a_damaged_weights_file_of_the_listed_size_is_one_line(tmp_path):
    directory = fake_checkpoint(tmp_path, weights=b"not a torch file" * 10)
    with pytest.raises(CheckpointError, match="checkpoint_a: cannot read the model weights .*: a damaged file"):
        load_weights_into(nn.Linear(4, 6), directory, load_config(DEMO), "demo.yaml")


def test_running_out_of_memory_while_loading_is_not_called_damage(tmp_path, monkeypatch):
    directory = fake_checkpoint(tmp_path)

    def no_memory(*args, **kwargs):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4096 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(CheckpointError, match=r"checkpoint_a: not enough memory to load the model weights "
                                              r"\(.*DefaultCPUAllocator: can't allocate memory") as err:
        load_weights_into(nn.Linear(4, 6), directory, load_config(DEMO), "demo.yaml")
    assert "damaged" not in str(err.value)


def test_export_refuses_a_folder_and_leaves_no_partial_file(tmp_path, monkeypatch):
    directory = fake_checkpoint(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="--out .*out is a folder; give a file name"):
        export_weights(directory, str(tmp_path / "out"))
    damaged = fake_checkpoint(tmp_path, "checkpoint_b", weights=b"x" * 100)
    with pytest.raises(CheckpointError):
        export_weights(damaged, str(tmp_path / "model.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_a", "checkpoint_b", "out"]
    import launcher.export

    def disk_full(state, path, metadata=None):  # writes part of the file, then fails
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(launcher.export, "save_file", disk_full)
        with pytest.raises(OSError, match="No space left"):
            export_weights(directory, str(tmp_path / "model.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_a", "checkpoint_b", "out"]  # no .partial left
    _, tensors, _ = export_weights(directory, str(tmp_path / "new" / "model.safetensors"))
    assert tensors == 2 and os.listdir(tmp_path / "new") == ["model.safetensors"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "--config", "configs/pft_swin_x_ade20k.yaml"], "config file not found (did you mean .*pft_swin_"),
    (["describe", "--config", "nowhere/zzz.yaml"], "config file not found (presets are in .*configs/)"),
    (["eval", "--checkpoint", "x", "--json", "{tmp}"], "--json .* is a folder; give a file name"),
    (["export", "--checkpoint", "x", "--out", "{tmp}"], "--out .* is a folder; give a file name"),
    (["predict", "--checkpoint", "x", "--num", "-1"], "--num -1: expected a number of images >= 1 (>= 0 for panoptic"),
    (["eval", "--checkpoint", "x", "--json", "{tmp}/file.txt/results.json"], "--json .*: .*file.txt is not a folder"),
])
def test_arguments_are_checked_before_anything_loads(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message.replace("(", r"\(").replace(")", r"\)"), err), err


def test_write_predictions_runs_without_autograd_and_refuses_zero_images(tmp_path, monkeypatch):
    batch = {"images": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "semantic": torch.zeros(2, 4, 4, dtype=torch.uint8),
             "keys": ["val_0", "val_1"], "sources": [None, None], "image_sizes": [(4, 4), (4, 4)]}
    monkeypatch.setattr(predict, "validation_batches", lambda cfg, desc, limit=None: iter([batch]))
    grad_enabled = []

    def scores(model, images, *args, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return torch.zeros(images.shape[0], 5, 4, 4)

    monkeypatch.setattr(predict, "predict_semantic_scores", scores)
    cfg = load_config(DEMO)
    with pytest.raises(ValueError, match="--num 0: expected a number of images >= 1"):
        predict.write_predictions(cfg, nn.Identity(), str(tmp_path), 0)
    written = predict.write_predictions(cfg, nn.Identity(), str(tmp_path), 1)
    assert [os.path.basename(p) for p in written] == ["val_0.png"] and grad_enabled == [False]
    assert os.listdir(tmp_path / "labels") == ["val_0.png"]


def test_a_second_predict_into_one_folder_leaves_only_its_own_maps(tmp_path, monkeypatch, capsys):
    def batch(*keys):
        n = len(keys)
        return {"images": torch.zeros(n, 3, 4, 4, dtype=torch.uint8), "semantic": torch.zeros(n, 4, 4, dtype=torch.uint8),
                "keys": list(keys), "sources": [None] * n, "image_sizes": [(4, 4)] * n}  # fmt: skip

    monkeypatch.setattr(predict, "predict_semantic_scores", lambda model, images, *a, **k: torch.zeros(len(images), 5, 4, 4))
    cfg = load_config(DEMO)
    monkeypatch.setattr(predict, "validation_batches", lambda cfg, desc, limit=None: iter([batch("val_0", "val_1")]))
    predict.write_predictions(cfg, nn.Identity(), str(tmp_path), 2)
    (tmp_path / "labels" / "mine.png").write_bytes(b"")  # the user's own file: never removed
    monkeypatch.setattr(predict, "validation_batches", lambda cfg, desc, limit=None: iter([batch("val_2")]))
    predict.write_predictions(cfg, nn.Identity(), str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path / "labels")) == ["mine.png", "val_2.png"]
    assert sorted(os.listdir(tmp_path / "ground_truth")) == ["val_2.png"]
    assert sorted(os.listdir(tmp_path)) == ["ground_truth", "labels", RECORD_FILE, "val_2.png"]
    out = capsys.readouterr().out
    assert "warning: 1 PNG in" in out and "labels/mine.png" in out, out


def test_the_record_is_only_ever_segscales_and_old_maps_go_only_once_data_is_read(tmp_path, monkeypatch):
    cfg = load_config(DEMO)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "val_0.png").write_bytes(b"")
    (tmp_path / RECORD_FILE).write_text(json.dumps({"tool": "segscale predict", "names": ["val_0"]}))

    def unreadable(cfg, desc, limit=None):
        raise ShardReadError("shard x: cannot read")
        yield  # a generator, as validation_batches is

    monkeypatch.setattr(predict, "validation_batches", unreadable)
    with pytest.raises(ShardReadError):
        predict.write_predictions(cfg, nn.Identity(), str(tmp_path), 1)
    assert (tmp_path / "labels" / "val_0.png").exists()  # the data failed: the last run's maps stay
    for record, message in ((["a"], "not a record written by segscale predict"),
                            ({"tool": "segscale predict", "names": "abc"}, "expected \"names\": a list")):
        (tmp_path / RECORD_FILE).write_text(json.dumps(record))
        with pytest.raises(ValueError, match=message):
            clear_previous(str(tmp_path), (str(tmp_path), str(tmp_path / "labels")))
        assert (tmp_path / "labels" / "val_0.png").exists()
