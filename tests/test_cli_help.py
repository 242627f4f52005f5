"""Every command line answers --help (argparse formats help strings with %: a literal '50%' once crashed it), through
``python -m mlx_holo.X``, the ``mlx-holo`` dispatcher, and each benchmark/experiment script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["compress", "eval", "bench", "validate", "plan", "tui"]
SUBCOMMANDS = ["compress", "eval", "bench", "validate", "plan", "tune", "synth", "tui"]
SCRIPTS = sorted(f"{d}/{p.name}" for d in ("benchmarks", "experiments") for p in (ROOT / d).glob("*.py"))
ENV = {**os.environ, "MLX_HOLO_NO_REEXEC": "1"}


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", f"mlx_holo.{m}"] for m in MODULES]
                         + [[sys.executable, "-m", "mlx_holo.cli.main", s] for s in SUBCOMMANDS]
                         + [[sys.executable, str(ROOT / s)] for s in SCRIPTS],
                         ids=MODULES + [f"mlx-holo {s}" for s in SUBCOMMANDS] + SCRIPTS)
def test_help(cmd):
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
    assert "RuntimeWarning" not in r.stderr  # e.g. runpy's "found in sys.modules" (a package importing itself)


def test_dispatcher_lists_commands_and_refuses_unknown():
    r = subprocess.run([sys.executable, "-m", "mlx_holo.cli.main"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and all(s in r.stdout for s in SUBCOMMANDS)
    r = subprocess.run([sys.executable, "-m", "mlx_holo.cli.main", "frobnicate"], capture_output=True, text=True,
                       env=ENV)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
