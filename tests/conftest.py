from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _imported_from() -> list[Path]:
    import treegrpo
    import treegrpo._core

    return [Path(str(m.__file__)).resolve() for m in (treegrpo, treegrpo._core)]


def pytest_report_header() -> str:
    return "treegrpo: " + ", ".join(map(str, _imported_from()))


def pytest_configure(config: pytest.Config) -> None:
    # `make pytest-wheel` sets TREEGRPO_EXPECT_INSTALLED=1: the tests must then exercise the wheel
    # installed in the running interpreter's environment, never the source tree under python/.
    if os.environ.get("TREEGRPO_EXPECT_INSTALLED") != "1":
        return
    prefix = Path(sys.prefix).resolve()
    source = Path(__file__).resolve().parents[1] / "python"
    for where in _imported_from():
        if not where.is_relative_to(prefix) or where.is_relative_to(source):
            raise pytest.UsageError(
                f"TREEGRPO_EXPECT_INSTALLED=1 but treegrpo was imported from {where}, not from "
                f"the installed wheel under {prefix}: something puts python/ on sys.path"
            )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random policy (treegrpo.testing.tiny) saved as a checkpoint directory, for the
    trainer's end-to-end tests (one per test module)."""
    pytest.importorskip("torch")
    from treegrpo.testing.tiny import tiny_policy

    model, tokenizer = tiny_policy(seed=0)
    out = tmp_path_factory.mktemp("tiny-policy")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def make_standin(policy: tuple[Any, Any]) -> Iterator[Callable[..., Any]]:
    """``make_standin(**options)``: a :class:`sglang_helpers.Standin` over the test module's
    ``policy`` fixture (a ``(model, tokenizer)`` pair), stopped after the test."""
    from sglang_helpers import Standin

    made: list[Standin] = []

    def make(**options: Any) -> Standin:
        made.append(Standin(policy, **options))
        return made[-1]

    yield make
    for s in made:
        s.stop()
