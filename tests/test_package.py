"""The installed package holds what the source tree holds (`make test` runs pytest on the wheel)."""

from __future__ import annotations

from pathlib import Path

import treegrpo

SOURCE = Path(__file__).resolve().parents[1] / "python" / "treegrpo"


def test_the_installed_package_holds_every_source_file():
    installed = Path(treegrpo.__file__).resolve().parent
    shipped = {".py", ".pyi", ".typed"}  # modules, the extension's stub, the py.typed marker
    wanted = sorted(
        p.relative_to(SOURCE).as_posix()
        for p in SOURCE.rglob("*")
        if p.is_file() and p.suffix in shipped and "__pycache__" not in p.parts
    )
    assert "py.typed" in wanted and "_core.pyi" in wanted
    assert [name for name in wanted if not (installed / name).is_file()] == []
