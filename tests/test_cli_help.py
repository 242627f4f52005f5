"""Every command line answers --help (argparse formats help strings with %: a literal '50%' once crashed it)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["compress", "eval", "bench", "validate", "plan", "tui"]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", f"mlx_holo.{m}"] for m in MODULES]
                         + [[sys.executable, str(ROOT / "benchmarks" / s)] for s in SCRIPTS],
                         ids=MODULES + SCRIPTS)
def test_help(cmd):
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "MLX_HOLO_NO_REEXEC": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
