"""The quantized matmul on Arm: csrc/quant.c cross-compiled for aarch64 (the portable loop, NEON
sdot with dotprod, usdot with i8mm) with tests/quant_check.c, and run under qemu. Each build
checks lmlab_qlinear against its definition on every layout (quant_check.c says how). The host's
own build runs the same program, so a failure here is the Arm path's, not the check's. The
tools come from Debian (``make cross``: gcc-aarch64-linux-gnu, qemu-user-static)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "src" / "lmlab" / "csrc"
CHECK = ROOT / "tests" / "quant_check.c"


def _build_and_run(cc: str, flags: list[str], run: list[str], out: Path) -> str:
    sources = [str(CHECK), str(CSRC / "quant.c")]
    argv = [cc, "-O2", *flags, "-fopenmp", "-Wno-psabi", "-I", str(CSRC), *sources, "-lm", "-o", str(out)]
    build = subprocess.run(argv, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    done = subprocess.run([*run, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_check_passes_on_the_host_build(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    line = _build_and_run(cc, ["-march=native"], [], tmp_path / "check")
    assert line.endswith("300 of 300 cases agree, ok"), line


@pytest.mark.parametrize(
    "march, isa",
    [
        ("armv8-a", "portable C"),
        ("armv8.2-a+dotprod", "NEON sdot (dotprod)"),
        ("armv8.6-a+i8mm", "NEON usdot (i8mm)"),
    ],
)
def test_arm_builds_agree_with_the_definition(tmp_path, march, isa):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64-static")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user-static (make cross)")
    line = _build_and_run(cc, [f"-march={march}", "-static"], [qemu, "-cpu", "max"], tmp_path / "check")
    assert line == f"int8 dot: {isa}: 300 of 300 cases agree, ok", line
