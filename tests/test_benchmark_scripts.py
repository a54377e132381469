"""The benchmark scripts as a user meets them, without running one (each takes seconds
to minutes): ``--help`` says what a script measures, how long it takes and what it
needs; a missing optional baseline or a bad ``--device`` is one line, not a traceback."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.endswith(".py") and f != "measure.py")
# Scripts whose baseline is Hugging Face transformers (setup.cfg's "bench" extra).
NEEDS_TRANSFORMERS = {"maskformer_vs_hf.py", "deform_attn_vs_hf.py", "op_breakdown.py"}
INSTALL = ".venv/bin/pip install -c constraints.txt -e '.[bench]'"

sys.path.insert(0, BENCH)  # the scripts import ``measure`` as a top-level module
import measure  # noqa: E402


def _source(name: str) -> str:
    with open(os.path.join(BENCH, name)) as f:
        return f.read()


@pytest.mark.parametrize("name", SCRIPTS)
def test_docstring_says_what_a_run_costs_and_needs(name):
    doc = ast.get_docstring(ast.parse(_source(name)), clean=False)
    cost = [p for p in doc.strip().split("\n\n") if p.startswith("Takes")]
    assert len(cost) == 1, f"{name}: no 'Takes ...' paragraph (run time, needs)"
    assert "Needs" in cost[0]
    assert (INSTALL in cost[0]) == (name in NEEDS_TRANSFORMERS), cost[0]
    source = _source(name)
    assert "benchmark_parser(__doc__)" in source or "kernel_parser(__doc__)" in source
    assert ("require_baseline()" in source) == (name in NEEDS_TRANSFORMERS)


def test_help_shows_the_cost_paragraph_and_defaults():
    parser = measure.kernel_parser(measure.__doc__ + "\n\nTakes 3 s. Needs nothing.\n")
    text = parser.format_help()
    assert "Takes 3 s. Needs nothing." in text and "(default: 7)" in text


def test_missing_baseline_is_one_line_with_the_install_command(capsys):
    with pytest.raises(SystemExit) as info:
        measure.require_baseline("segscale_no_such_module")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "segscale_no_such_module" in err and INSTALL in err


def test_bad_device_is_an_argparse_error():
    for bad in ("gpu", "cuda:0" if not measure.torch.cuda.is_available() else "tpu"):
        with pytest.raises(SystemExit) as info:
            measure.kernel_parser("x").parse_args(["--device", bad])
        assert info.value.code == 2


def test_a_script_without_transformers_stops_before_any_work(tmp_path):
    # A stand-in package that fails to import, as a missing one does.
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, os.path.join(BENCH, "deform_attn_vs_hf.py"), "--dtype", "fp32"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and INSTALL in out.stderr and not out.stdout
