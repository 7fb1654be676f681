"""Every config field acts or is refused; defaults follow the reference; bad values are named.

The audit reads python/treegrpo with ``ast``: a field counts as read where code loads
``<receiver>.<field>`` and the receiver is known to hold that field's config class: a parameter
annotated with the class, ``self.X`` assigned from one, a section of one (``cfg.tree``,
``self.cfg.engine``, ``cfg.model.scratch``...), or a ``dataclasses.replace`` of one. The
classes are TrainConfig and every dataclass its fields hold, found from the type hints. Reads
inside the class's own ``__post_init__`` (validation) do not count. A field nothing reads must
be listed in ``NOT_READ`` with the reason it needs no reader, and a test below checks that
reason's behaviour (a refusal, or where else the value acts).
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
from treegrpo.config import (
    ConfigError,
    DataConfig,
    LearnerConfig,
    RolloutConfig,
    TrainConfig,
    load_config,
)

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "treegrpo"


def config_classes(root: type) -> tuple[dict[str, type], dict[str, dict[str, str]]]:
    """``root`` and every dataclass its fields hold (recursively), by name, and for each the
    fields that hold another one (field -> class name)."""
    classes: dict[str, type] = {}
    nested: dict[str, dict[str, str]] = {}
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls.__name__ in classes:
            continue
        classes[cls.__name__] = cls
        nested[cls.__name__] = {}
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint) and isinstance(hint, type):
                nested[cls.__name__][name] = hint.__name__
                todo.append(hint)
    return classes, nested


CLASSES, NESTED = config_classes(TrainConfig)
# Fields no code needs to read, each with the reason and the test of that behaviour below.
NOT_READ = {
    ("TrainConfig", "preset"): "load_config applies the preset to the raw mapping before the "
    "dataclass is built; the field records which one in config.json "
    "(test_the_preset_acts_before_the_dataclass_is_built)",
}


def _annotation_class(node: ast.expr | None, known: dict[str, type]) -> str | None:
    """The config class named by an annotation (``X``, ``X | None``, ``"X"``)."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _annotation_class(ast.parse(node.value, mode="eval").body, known)
    if isinstance(node, ast.Name) and node.id in known:
        return node.id
    if isinstance(node, ast.Attribute) and node.attr in known:
        return node.attr
    if isinstance(node, ast.BinOp):
        return _annotation_class(node.left, known) or _annotation_class(node.right, known)
    return None


class _Reads(ast.NodeVisitor):
    """Collects (class name, field) pairs loaded through receivers of a known config class."""

    def __init__(self, known: dict[str, type], nested: dict[str, dict[str, str]]) -> None:
        self.known, self.nested = known, nested
        self.reads: set[tuple[str, str]] = set()
        self.self_attrs: dict[str, str] = {}  # self.<attr> -> class, for the class being read
        self.env: dict[str, str] = {}  # local name -> class, in the function being read
        self.owner: str | None = None  # the config class whose body is being read

    def resolve(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                if self.owner is not None:
                    return None  # a field of the class itself: read as self.<field> below
                return self.self_attrs.get(node.attr)
            owner = self.resolve(node.value)
            return self.nested.get(owner, {}).get(node.attr) if owner else None
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else None
            name = node.func.id if isinstance(node.func, ast.Name) else name
            if name == "replace" and node.args:
                return self.resolve(node.args[0])
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved = self.self_attrs, self.owner
        self.self_attrs, self.owner = {}, node.name if node.name in self.known else None
        for item in ast.walk(node):  # self.X = <config> anywhere in the class, first
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                env = self._params(item)
                for sub in ast.walk(item):
                    if isinstance(sub, ast.Assign):
                        self._bind(sub, env)
        self.generic_visit(node)
        self.self_attrs, self.owner = saved

    def _params(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, str]:
        env = {}
        for arg in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs):
            kind = _annotation_class(arg.annotation, self.known)
            if kind is not None:
                env[arg.arg] = kind
        return env

    def _bind(self, node: ast.Assign, env: dict[str, str]) -> None:
        saved, self.env = self.env, env
        try:
            targets = node.targets
            values = [node.value]
            if len(targets) == 1 and isinstance(targets[0], ast.Tuple):
                if isinstance(node.value, ast.Tuple):  # a, self.b = x, y
                    targets, values = list(targets[0].elts), list(node.value.elts)
            for target, value in zip(targets, values * len(targets), strict=False):
                kind = self.resolve(value)
                if kind is None:
                    continue
                if isinstance(target, ast.Name):
                    env[target.id] = kind
                elif (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    self.self_attrs[target.attr] = kind
        finally:
            self.env = saved

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self.owner is not None and node.name == "__post_init__":
            return  # validation is not a use
        saved = self.env
        self.env = {**saved, **self._params(node)}
        if self.owner is not None:
            self.env["self"] = self.owner
        for stmt in node.body:
            self._statement(stmt)
        self.env = saved

    def _statement(self, stmt: ast.stmt) -> None:
        for sub in ast.walk(stmt):  # bindings first, in order, then every load
            if isinstance(sub, ast.Assign):
                self._bind(sub, self.env)
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Load):
                if _is_self(sub.value):
                    owner = self.env.get("self")
                elif isinstance(sub.value, ast.Attribute) and _is_self(sub.value.value):
                    # self.<section>.<field> inside a config class's own method
                    outer = self.env.get("self")
                    owner = self.nested.get(outer, {}).get(sub.value.attr) if outer else None
                    owner = owner or self.resolve(sub.value)
                else:
                    owner = self.resolve(sub.value)
                if owner is not None:
                    self.reads.add((owner, sub.attr))
            if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                self._function(sub)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def reads_in(
    sources: list[str], known: dict[str, type], nested: dict[str, dict[str, str]]
) -> set[tuple[str, str]]:
    visitor = _Reads(known, nested)
    for source in sources:
        visitor.visit(ast.parse(source))
    return visitor.reads


def unread_fields(
    sources: list[str], known: dict[str, type], nested: dict[str, dict[str, str]]
) -> list[tuple[str, str]]:
    """(class, field) of every field of ``known`` that no code in ``sources`` reads (a field
    holding a nested config class is checked through its own fields)."""
    reads = reads_in(sources, known, nested)
    out = []
    for name, cls in known.items():
        for f in dataclasses.fields(cls):
            if f.name not in nested[name] and (name, f.name) not in reads:
                out.append((name, f.name))
    return out


def package_sources() -> list[str]:
    return [p.read_text() for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_config_field_is_read_or_refused_with_a_reason() -> None:
    assert {"ModelConfig", "ScratchConfig", "RolloutConfig", "LearnerConfig"} <= CLASSES.keys()
    unread = unread_fields(package_sources(), CLASSES, NESTED)
    unexplained = [f"{c}.{f}" for c, f in unread if (c, f) not in NOT_READ]
    assert not unexplained, f"config fields nothing reads (use them or refuse them): {unexplained}"
    stale = [f"{c}.{f}" for c, f in NOT_READ if (c, f) not in unread]
    assert not stale, f"listed as refused but read somewhere: {stale}"


@dataclasses.dataclass
class Part:
    """The audit's control case: a section with a field only its validation reads."""

    used: int = 0
    checked_only: int = 0
    via_replace: int = 0

    def __post_init__(self) -> None:
        assert self.checked_only >= 0


@dataclasses.dataclass
class Whole:
    part: Part


def test_the_audit_finds_an_unread_field_and_follows_receivers() -> None:
    source = """
from dataclasses import replace

class Part:
    def __post_init__(self):
        assert self.checked_only >= 0

class Runner:
    def __init__(self, cfg: Whole):
        self.cfg = cfg

    def go(self):
        part = replace(self.cfg.part, used=1)
        return part.used + replace(part).via_replace

def unrelated(x):
    return x.checked_only  # an unknown receiver: not a read of Part
"""
    known, nested = config_classes(Whole)
    assert known == {"Whole": Whole, "Part": Part}
    unread = unread_fields([source], known, nested)
    assert ("Part", "checked_only") in unread
    assert ("Part", "used") not in unread and ("Part", "via_replace") not in unread


# ---------------------------------------------------------------------- refusals and defaults


def test_the_preset_acts_before_the_dataclass_is_built() -> None:
    from treegrpo.config import PRESETS

    tiny = load_config(None, ["preset=tiny"])
    assert tiny.preset == "tiny" and tiny.to_dict()["preset"] == "tiny"
    assert tiny.model.path == PRESETS["tiny"]["model"]["path"] != "default"
    assert load_config(None, ["preset=smollm2"]).model.path == "default"


def test_weight_sync_values_and_the_settings_that_go_with_them() -> None:
    sglang = ["engine.kind=sglang", "engine.urls=[http://x:1]"]
    with pytest.raises(ConfigError, match=r"engine.weight_sync must be one of 'disk', 'distrib"):
        load_config(None, [*sglang, "engine.weight_sync=nccl"])  # an unknown value
    assert load_config(None, ["engine.weight_sync=disk"]).engine.weight_sync == "disk"
    cfg = load_config(None, [*sglang, "engine.weight_sync=distributed", "engine.sync_port=29600"])
    assert (cfg.engine.weight_sync, cfg.engine.sync_port) == ("distributed", 29600)
    with pytest.raises(ConfigError, match=r"distributed only acts with engine\.kind=sglang"):
        load_config(None, ["engine.weight_sync=distributed"])  # embedded: shared weights
    distributed = [*sglang, "engine.weight_sync=distributed"]
    for overrides, match in (
        ([*distributed, "engine.sync_dir=/w"], "sync_dir is only used with engine.weight_sync=d"),
        ([*sglang, "engine.sync_port=29600"], "sync_port is only used with engine.weight_sync="),
        ([*sglang, "engine.sync_address=10.0.0.1"], "sync_address is only used with"),
        ([*distributed, "engine.sync_port=70000"], r"sync_port must be a TCP port in \[0, 65535"),
        ([*distributed, "engine.sync_address= "], "sync_address must be a host name"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)


@pytest.mark.parametrize("preset", ["smollm2", "tiny"])
def test_defaults_follow_the_reference(preset: str) -> None:
    cfg = load_config(None, [f"preset={preset}"])
    assert cfg.env.truncated_action == "invalid"  # a cut step gets the invalid-action message
    assert cfg.env.format_reward  # Tree-GRPO's format-shaped reward
    assert cfg.tree.overexpand_penalty == 0.0  # uniform draws, no penalty
    assert cfg.tree.max_model_len is None  # the model's context length
    # the reference's settings (smollm2, the dataclass defaults): 8 updates a step where the
    # batch allows; the tiny preset keeps the one update a step it was tuned with
    expect = {"smollm2": "auto", "tiny": None}[preset]
    assert cfg.learner.ppo_mini_batch_size == expect
    assert TrainConfig().learner.ppo_mini_batch_size == "auto"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["env.truncated_action=stop"], "env.truncated_action must be one of 'invalid', 'leaf'"),
        (["learner.ppo_mini_batch_size=3"], r"learner.ppo_mini_batch_size=3 .* must divide"),
        (["learner.ppo_mini_batch_size=0"], "ppo_mini_batch_size"),
        (["learner.ppo_mini_batch_size=half"], "ppo_mini_batch_size"),
        (["tree.overexpand_penalty=-1"], "overexpand_penalty must be a finite number >= 0"),
        (["tree.max_model_len=1"], "max_model_len must be None"),
        # settings that cannot act in the chosen mode are refused, not ignored
        (["engine.urls=[http://x:1]"], "engine.urls is only used with engine.kind=sglang"),
        (["engine.sync_dir=/tmp/w"], "engine.sync_dir is only used with engine.kind=sglang"),
        (["env.retriever_url=http://x:1"], "env.retriever_url is only used with"),
        (["learner.temperature=0.7"], "learner.temperature=0.7 has no effect in training"),
    ],
)
def test_bad_values_are_named(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.train_batch_size=4", *overrides])


def test_learner_temperature_may_state_the_rollouts() -> None:
    cfg = load_config(None, ["tree.temperature=0.7", "learner.temperature=0.7"])
    assert cfg.learner.temperature == cfg.tree.temperature == 0.7


def test_an_explicit_ppo_mini_batch_size_is_accepted() -> None:
    cfg = load_config(None, ["data.train_batch_size=8", "learner.ppo_mini_batch_size=2"])
    assert cfg.learner.ppo_mini_batch_size == 2
    assert cfg.learner.updates_per_epoch(cfg.data.train_batch_size) == 4
    cfg = load_config(None, ["learner.ppo_mini_batch_size=null"])
    assert cfg.learner.ppo_mini_batch_size is None


def test_config_imports_no_torch() -> None:
    """Loading a config (what `treegrpo train --help`, validation and the CLI do first) must
    not pull in torch: every section's dataclass lives in treegrpo.config."""
    import subprocess
    import sys

    code = (
        "import sys, treegrpo.config as c; c.load_config(None, ['tree.m=3']); "
        "assert 'torch' not in sys.modules, 'treegrpo.config imported torch'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_core_option_values_come_from_the_core() -> None:
    """The values the config accepts for an option the Rust core parses are the core's own:
    each one is accepted by the core, and the core's error lists the same ones."""
    import treegrpo
    from treegrpo._core import OPTIONS
    from treegrpo.config import AlgorithmConfig

    hints = typing.get_type_hints(LearnerConfig)
    aggs = typing.get_args(hints["loss_agg_mode"])
    estimators = typing.get_args(typing.get_type_hints(AlgorithmConfig)["adv_estimator"])
    assert aggs == tuple(OPTIONS["loss_agg_mode"]) and len(aggs) == 3
    assert estimators == tuple(OPTIONS["adv_estimator"]) and "grpo" in estimators
    forest = treegrpo.Forest()
    leaf = forest.add_step(forest.add_root(0, [1]), [2], leaf=True)
    forest.set_reward(leaf, 1.0)
    for estimator in estimators:
        forest.advantages(estimator)
        AlgorithmConfig(adv_estimator=estimator)
    for mode in aggs:
        assert forest.pack(loss_agg_mode=mode).loss_agg_mode == mode
        LearnerConfig(loss_agg_mode=mode, warmup_steps=0)
    with pytest.raises(treegrpo.InvalidOptionError) as core:
        forest.pack(loss_agg_mode="sum")
    assert all(repr(mode) in str(core.value) for mode in aggs)
    with pytest.raises(ConfigError, match="seq-mean-token-sum"):
        LearnerConfig(loss_agg_mode="sum", warmup_steps=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("section", "kwargs", "match"),
    [
        (RolloutConfig, {"m": 0}, r"RolloutConfig: m \(trees per prompt\)"),
        (LearnerConfig, {"lr": 0}, "LearnerConfig.lr must be a finite number > 0"),
        (
            LearnerConfig,
            {"kl_type": "k9", "warmup_steps": 0},
            "LearnerConfig.kl_type must be one of",
        ),
        (DataConfig, {"val_size": -1}, "data.val_size must be >= 0"),
        (TrainConfig, {"preset": "nope"}, "unknown preset"),
    ],
)
def test_every_section_raises_one_error_class(section: type, kwargs: dict, match: str) -> None:
    """ConfigError everywhere, still the ValueError / InvalidArgumentError / InvalidOptionError
    callers caught before the sections moved into treegrpo.config."""
    import treegrpo

    with pytest.raises(ConfigError, match=match) as error:
        section(**kwargs)
    assert isinstance(error.value, ValueError | treegrpo.InvalidArgumentError)
    assert isinstance(error.value, treegrpo.InvalidOptionError)


SGLANG = ["engine.kind=sglang", "engine.urls=[http://a:1,http://b:2]"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["engine.routing=hash"], "engine.routing must be one of 'tree', 'round_robin', 'router'"),
        (["engine.routing=router"], "engine.routing=router needs engine.router_url"),
        (["engine.router_url=http://r:3"], "engine.router_url is only used with engine.routing"),
        (["engine.routing=router", "engine.router_url=r:3"], "must be http"),
    ],
)
def test_engine_routing_is_validated(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*SGLANG, *overrides])


def test_engine_routing_needs_sglang_servers() -> None:
    with pytest.raises(ConfigError, match=r"engine.routing only acts with engine.kind=sglang"):
        load_config(None, ["engine.routing=round_robin"])
    cfg = load_config(None, [*SGLANG, "engine.routing=router", "engine.router_url=http://r:3"])
    assert (cfg.engine.routing, cfg.engine.router_url) == ("router", "http://r:3")
    assert load_config(None, SGLANG).engine.routing == "tree"
