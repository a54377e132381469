"""``python -m launcher build-ops`` as a user meets it: one line per kind of kernel, the
reason where segscale's C kernels cannot be built, and a one-line error for a bad
SEGSCALE_NATIVE_OPS. DeepSpeed's build is stubbed out (tests/test_winograd_native.py
covers the C build itself)."""

import pytest

import launcher.environment
from launcher.cli import main
from ops import cpu_native


@pytest.fixture
def build_ops(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launcher.environment, "build_deepspeed_ops", lambda: ["stub_op"])
    monkeypatch.setenv("SEGSCALE_NATIVE_DIR", str(tmp_path))
    cpu_native.load.cache_clear()

    def run():
        code = main(["build-ops"])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    yield run
    cpu_native.load.cache_clear()


def test_without_a_compiler_the_reason_is_on_the_kernels_line(build_ops, monkeypatch, recwarn):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    code, out, err = build_ops()
    assert code == 0 and err == []
    assert out[-1] == (
        "segscale C kernels (ops/winograd_cpu.c) not built: no C compiler (/nonexistent/cc) for "
        "ops/winograd_cpu.c; the PyTorch path runs"
    )
    assert not [w for w in recwarn if "C compiler" in str(w.message)]  # said once, on that line


def test_switched_off_says_so(build_ops, monkeypatch):
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "0")
    code, out, _ = build_ops()
    assert code == 0
    assert out[-1] == (
        "segscale C kernels (ops/winograd_cpu.c) not built: switched off by SEGSCALE_NATIVE_OPS=0; "
        "the PyTorch path runs"
    )


def test_a_bad_switch_value_is_a_one_line_error(build_ops, monkeypatch):
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "off")
    code, _, err = build_ops()
    assert code == 2
    assert err == ["error: SEGSCALE_NATIVE_OPS must be 0 (PyTorch path) or 1 (C kernels), got 'off'"]
