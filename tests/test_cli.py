from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import treegrpo
from packaging.version import Version
from treegrpo.cli import main


def test_demo_prints_the_worked_example(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "Forest(groups=1, trees=2, nodes=10, leaves=6)" in out
    advantages = sorted(round(float(line.split()[-1]), 3) for line in out.splitlines()[2:8])
    assert advantages == sorted([1.849, 1.849, -1.678, 0.054, -2.127, 0.054])
    assert (
        "arrives" not in out and "`treegrpo train` (no arguments: the embedded quickstart)" in out
    )


def test_version_from_the_installed_command():
    # The console script the package installs (not only `python -m treegrpo`): a wheel without
    # the [project.scripts] entry fails here.
    scripts = Path(sysconfig.get_path("scripts"))
    command = next(p for p in (scripts / "treegrpo", scripts / "treegrpo.exe") if p.exists())
    for argv in ([str(command)], [sys.executable, "-m", "treegrpo"]):
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == f"treegrpo {treegrpo.__version__}"
    assert treegrpo._core.BUILD_PROFILE == "release"


def test_version_comes_from_cargo_toml():
    # Cargo.toml's package version is the one place the version is written: maturin puts it in
    # the distribution's metadata (PEP 440 form), and the extension was built from the same one.
    manifest = (Path(__file__).parents[1] / "Cargo.toml").read_text()
    cargo = re.search(r'^version = "([^"]+)"', manifest, re.MULTILINE)
    assert cargo is not None
    assert treegrpo.__version__ == importlib.metadata.version("treegrpo")
    assert treegrpo.__version__ == str(Version(cargo.group(1)))
    assert treegrpo._core.__version__ == cargo.group(1), "stale extension: rebuild it"


def test_the_cli_runs_without_the_optional_dependencies():
    # `pip install treegrpo` without extras has no torch, transformers or matplotlib: the command
    # must still start (every subcommand registers) and run what needs only the core.
    hide = "import sys; sys.modules.update(dict.fromkeys(['torch', 'transformers', 'matplotlib']))"
    run = "from treegrpo.cli import main; sys.exit(main(sys.argv[1:]))"
    for argv in (["--version"], ["demo"], ["train"]):
        done = subprocess.run(
            [sys.executable, "-c", f"{hide}; {run}", *argv], capture_output=True, text=True
        )
        if argv == ["train"]:  # listed, and says what to install, in one line
            assert done.returncode == 2, done.stderr
            assert done.stderr.strip().splitlines() == [
                "treegrpo train: error: `treegrpo train` needs torch, transformers: "
                "pip install 'treegrpo[train]'"
            ]
        else:
            assert done.returncode == 0, done.stderr
