"""How the demo ends when its training run does not finish: Ctrl-C, a failed run, or
another exit, each with the line that tells the user what to do next."""

import os
import signal

import pytest

from launcher import demo
from launcher.driver import TrainingFailed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo.yaml")


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "ensure_synthetic_data", lambda cfg: None)
    return [f"train.output_dir={tmp_path}", "train.run_name=r1"]


def _ray_ctrl_c(cfg):
    """What a Ctrl-C does to fit(): Ray Train's handler, which does not chain to any other,
    takes the SIGINT, and the cancelled wait ends in Ray's SystemExit(1)."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        os.makedirs(os.path.join(cfg.train.output_dir, cfg.train.run_name))
        with open(os.path.join(cfg.train.output_dir, cfg.train.run_name, "config.yaml"), "w") as f:
            f.write("{}\n")  # the driver saved it when the run started
        signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    raise SystemExit(1)


def test_ctrl_c_exits_130_with_how_to_resume(monkeypatch, no_data, tmp_path, capsys):
    monkeypatch.setattr(demo, "run_training", _ray_ctrl_c)
    assert demo.run_demo(CONFIG, no_data) == 130
    out = capsys.readouterr().out
    assert out.endswith(f"\ninterrupted; resume it with: python -m launcher demo --config "
                        f"{tmp_path}/r1/config.yaml\n"), out


def test_other_exits_are_not_taken_for_ctrl_c(monkeypatch, no_data):
    def other_exit(cfg):
        raise SystemExit(3)

    monkeypatch.setattr(demo, "run_training", other_exit)
    with pytest.raises(SystemExit) as stop:
        demo.run_demo(CONFIG, no_data)
    assert stop.value.code == 3


def test_failed_run_says_how_to_resume(monkeypatch, no_data, capsys):
    def fail(cfg):
        raise TrainingFailed("run r1 failed: RuntimeError: boom", causes=frozenset({"RuntimeError"}))

    monkeypatch.setattr(demo, "run_training", fail)
    assert demo.run_demo(CONFIG, no_data) == 1
    assert capsys.readouterr().out == ("error: run r1 failed: RuntimeError: boom\n"
                                       "resume it with the same command and --set train.run_name=r1\n")
