from __future__ import annotations

import subprocess
import sys

import treegrpo
from treegrpo.cli import main


def test_demo_prints_the_worked_example(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "Forest(groups=1, trees=2, nodes=10, leaves=6)" in out
    advantages = sorted(round(float(line.split()[-1]), 3) for line in out.splitlines()[2:8])
    assert advantages == sorted([1.849, 1.849, -1.678, 0.054, -2.127, 0.054])


def test_version_from_the_installed_command():
    done = subprocess.run(
        [sys.executable, "-m", "treegrpo", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"treegrpo {treegrpo.__version__}"
    assert treegrpo._core.BUILD_PROFILE == "release"
