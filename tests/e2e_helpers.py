"""Helpers of the end-to-end tests that run the real CLI (the dataset fixture is in conftest.py)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher(*args, timeout=420, env=None):
    """Run ``python -m launcher ARGS`` in the repository; (exit code, stdout + stderr).

    ``env`` adds variables (e.g. ``SEGSCALE_FAULT``) to this process's environment.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)  # a local instance (or a head `ray start` runs on this machine)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def tiny_run_args(dataset, output_dir, run_name: str, *sets: str) -> list[str]:
    """``train`` arguments for configs/test_tiny.yaml on the ``dataset`` fixture's shards,
    plus one ``--set`` per item of ``sets``."""
    args = [
        "--config",
        "configs/test_tiny.yaml",
        "--set",
        f"data.train_manifest={dataset}/train-manifest.json",
        "--set",
        f"data.val_manifest={dataset}/val-manifest.json",
        "--set",
        f"train.output_dir={output_dir}",
        "--set",
        f"train.run_name={run_name}",
    ]
    for item in sets:
        args += ["--set", item]
    return args
