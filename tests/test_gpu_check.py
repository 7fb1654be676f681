"""bench/gpu_check.py without a GPU: its arguments, the path that finds no CUDA, and the logic
that turns sub-results (pytest's JUnit XML, bench/learner.py's JSON, a run's metrics.jsonl)
into checks, the JSON and the exit status. (No test here has "cuda" in its name: the device
run selects its tests with ``-k cuda``.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check as gc  # noqa: E402
from common import check_targets  # noqa: E402

# ------------------------------------------------------------------------- arguments


def test_default_arguments() -> None:
    args = gc.parse_args([])
    assert args.out == ROOT / "bench" / "results" / "gpu_check.json"
    assert (args.budget_s, args.train_steps, args.skip, args.model_dir) == (400.0, 3, [], None)
    assert args.overrides == [] and args.log is None and not args.prepare


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget-s", "0"], "--budget-s must be a number of seconds > 0"),
        (["--budget-s", "nan"], "--budget-s must be a number of seconds > 0"),
        (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
        (["--learner-prompts", "-1"], "--learner-prompts must be >= 1, got -1"),
        (["--skip", "nosuch"], "invalid choice: 'nosuch'"),
        (["--set", "novalue"], "'novalue' is not KEY=VALUE"),
        (["--out", "gpu.txt"], "give a path ending in .json"),
        (["--model-dir", "/nonexistent/model"], "no config.json there"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_model_dir_and_overrides_are_taken(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    args = gc.parse_args(["--model-dir", str(tmp_path), "--set", "tree.m=4", "--skip", "tests"])
    assert args.model_dir == tmp_path and args.overrides == ["tree.m=4"]
    steps = gc.plan(args, tmp_path, None)
    by_name = dict(steps)
    assert [name for name, _ in steps] == list(gc.CHECKS)
    skipped = by_name["tests"]
    assert isinstance(skipped, gc.Check) and (skipped.status, skipped.selected) == (
        "skipped",
        False,
    )
    assert callable(by_name["train_model_dir"])  # selected, since a model dir was given
    no_dir = dict(gc.plan(gc.parse_args([]), tmp_path, None))["train_model_dir"]
    assert isinstance(no_dir, gc.Check) and no_dir.reason == "no --model-dir"


def test_a_check_whose_packages_are_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gc, "missing", lambda names: [n for n in names if n == "polars"])
    steps = dict(gc.plan(gc.parse_args([]), tmp_path, None))
    assert isinstance(steps["tests"], gc.Check) and steps["tests"].status == "error"
    assert "missing Python packages: polars" in str(steps["tests"].reason)
    assert callable(steps["learner_sdpa"])  # the learner benchmark does not need polars


def test_without_the_extension_every_selected_check_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    why = "treegrpo does not import (no module named treegrpo._core): ..."
    monkeypatch.setattr(gc, "extension_problem", lambda: why)
    monkeypatch.setattr(gc, "cuda_status", lambda: (True, "a stand-in GPU"))
    monkeypatch.setattr(gc, "cuda_info", lambda: {"gpu": "stand-in"})
    out = tmp_path / "gpu.json"
    assert gc.main(["--out", str(out), "--skip", "tests"]) == 1
    checks = {c["name"]: (c["status"], c["reason"]) for c in json.loads(out.read_text())["checks"]}
    assert checks["tests"] == ("skipped", "--skip")
    assert checks["train_model_dir"] == ("skipped", "no --model-dir")
    names = ("train_float32", "train_scratch", "learner_sdpa", "learner_flex_attention")
    for name in (*names, "train_bfloat16"):
        assert checks[name] == ("error", why)


def test_train_overrides_are_config_keys_and_extra_ones_win(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    from treegrpo.config import load_config

    overrides = gc.train_overrides(
        tmp_path / "run",
        3,
        "bfloat16",
        preset="smollm2",
        warm_start=True,
        extra=["model.device=cpu"],
    )
    cfg = load_config(None, ["model.path=/some/where", *overrides])
    assert (cfg.model.device, cfg.model.dtype, cfg.model.sft_steps) == ("cpu", "bfloat16", 2)
    assert cfg.trainer.total_steps == 3 and cfg.trainer.run_dir == str(tmp_path / "run")
    assert cfg.preset == "smollm2" and cfg.data.val_size == 2
    cold = gc.train_overrides(tmp_path, 1, "float32", preset="tiny", warm_start=False, extra=[])
    scratch = load_config(None, cold)
    assert (scratch.preset, scratch.model.path, scratch.model.device) == ("tiny", "scratch", "cuda")
    assert scratch.model.sft_steps == 0 and scratch.data.synth_docs == 80


# ------------------------------------------------------------------------- without CUDA


def test_without_a_gpu_it_says_so_runs_nothing_and_exits_0(tmp_path: Path) -> None:
    out, log = tmp_path / "gpu.json", tmp_path / "gpu.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "python")}
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out), "--log", str(log)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "gpu_check: no CUDA device here" in done.stdout
    assert "nothing run, nothing written" in done.stdout
    assert not out.exists() and not log.exists()


def test_main_runs_no_check_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*_: Any) -> Any:
        raise AssertionError("nothing may run without CUDA")

    monkeypatch.setattr(gc, "cuda_status", lambda: (False, "no driver"))
    monkeypatch.setattr(gc, "plan", never)
    monkeypatch.setattr(gc, "cuda_info", never)
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 0
    assert "no CUDA device here (no driver)" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


def test_main_writes_the_json_after_every_check_and_exits_1_on_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "res" / "gpu.json"
    seen: list[str] = []

    def first(left: float) -> gc.Check:
        seen.append(json.loads(out.read_text())["status"])  # written before any check
        return gc.Check("tests", "passed", "5 passed, 0 skipped")

    def second(left: float) -> gc.Check:
        seen.append(json.loads(out.read_text())["status"])
        return gc.Check("train_float32", "failed", "steps logged [1], expected 1..3")

    def steps(args: Any, work: Path, log: Any) -> list[tuple[str, Any]]:
        assert work.is_dir() and log is not None
        rest = [(n, gc.Check(n, "skipped", "--skip", selected=False)) for n in gc.CHECKS[2:]]
        return [("tests", first), ("train_float32", second), *rest]

    monkeypatch.setattr(gc, "cuda_status", lambda: (True, "a stand-in GPU"))
    monkeypatch.setattr(gc, "cuda_info", lambda: {"gpu": "stand-in", "torch": "x"})
    monkeypatch.setattr(gc, "plan", steps)
    code = gc.main(["--out", str(out), "--log", str(tmp_path / "log.txt")])
    assert code == 1
    assert seen == ["running: 0 of 7 checks done", "running: 1 of 7 checks done"]
    doc = json.loads(out.read_text())
    assert doc["status"] == "failed" and doc["cuda"] == {"gpu": "stand-in", "torch": "x"}
    assert [c["status"] for c in doc["checks"]] == ["passed", "failed"] + ["skipped"] * 5
    assert (tmp_path / "log.txt").exists()


# ------------------------------------------------------------------------- aggregation


def check(name: str, status: str, selected: bool = True) -> gc.Check:
    return gc.Check(name, status, f"{status} on purpose", selected=selected)


@pytest.mark.parametrize(
    ("statuses", "overall", "code"),
    [
        ([("passed", True), ("passed", True)], "passed", 0),
        ([("passed", True), ("skipped", False)], "passed", 0),  # left out on purpose
        ([("passed", True), ("failed", True)], "failed", 1),
        ([("passed", True), ("error", True)], "failed", 1),
        ([("passed", True), ("skipped", True)], "incomplete", 1),  # not started: no time
        ([("failed", True), ("skipped", True)], "failed", 1),
        ([("skipped", False)], "nothing", 0),
    ],
)
def test_overall_status_and_exit_status(
    statuses: list[tuple[str, bool]], overall: str, code: int
) -> None:
    checks = [check(f"c{i}", s, sel) for i, (s, sel) in enumerate(statuses)]
    assert gc.overall(checks) == overall
    assert gc.exit_status(checks) == code


def test_run_checks_in_order_within_the_budget() -> None:
    now = [0.0]
    ran: list[str] = []
    written: list[list[str]] = []

    def takes(name: str, seconds: float) -> Any:
        def run(left: float) -> gc.Check:
            ran.append(f"{name}:{left:.0f}")
            now[0] += seconds
            return gc.Check(name, "passed")

        return run

    def raises(left: float) -> gc.Check:
        ran.append("boom")
        now[0] += 10
        raise RuntimeError("CUDA error: an illegal memory access")

    steps = [
        ("a", takes("a", 100)),
        ("b", raises),
        ("c", check("c", "skipped", selected=False)),
        ("d", takes("d", 60)),
        ("e", takes("e", 1)),  # 200 - 100 - 10 - 60 = 30 s left: still started
        ("f", takes("f", 1)),  # 29 s left: not started
    ]
    done = gc.run_checks(
        steps,
        200,
        on_done=lambda checks: written.append([c.name for c in checks]),
        clock=lambda: now[0],
    )
    assert ran == ["a:200", "boom", "d:90", "e:30"]
    assert [(c.name, c.status) for c in done] == [
        ("a", "passed"),
        ("b", "error"),
        ("c", "skipped"),
        ("d", "passed"),
        ("e", "passed"),
        ("f", "skipped"),
    ]
    assert done[1].reason == "RuntimeError: CUDA error: an illegal memory access"
    assert done[1].seconds == 10 and done[0].seconds == 100
    assert done[5].reason == "not started: 29 s of the 200 s budget left" and done[5].selected
    assert written == [list("abcdef"[: i + 1]) for i in range(6)]
    assert gc.exit_status(done) == 1


def test_the_json_marks_what_did_not_run_and_keeps_the_schema(tmp_path: Path) -> None:
    from common import write_results

    args = gc.parse_args(["--skip", "learner_flex_attention"])
    info = {"torch": "2.x", "cuda": "13.0", "gpu": "NVIDIA H200"}
    passed = gc.Check("tests", "passed", "6 passed, 0 skipped")
    passed.targets = [gc.target("grad rel", 1e-6, "<=", 1e-4, "rel")]
    partial = gc.payload([passed], info, args, 12.0, pending=("train_float32",))
    assert partial["status"] == "running: 1 of 2 checks done"
    assert partial["checks"][1]["status"] == "skipped"
    assert "had not reached it" in partial["checks"][1]["reason"]
    failed = gc.Check("train_float32", "failed", "step 2: actor/grad_norm missing or not finite")
    not_started = gc.Check("train_bfloat16", "skipped", "not started: 3 s of the 400 s budget")
    left_out = gc.Check("learner_flex_attention", "skipped", "--skip", selected=False)
    body = gc.payload([passed, failed, not_started, left_out], info, args, 99.0)
    path = write_results("gpu_check", body, tmp_path / "gpu.json")
    doc = json.loads(path.read_text())
    assert doc["status"] == "failed" and doc["issue"] == 18 and doc["cuda"] == info
    assert check_targets(doc["targets"]) == [] and len(doc["targets"]) == 1
    statuses = {c["name"]: (c["status"], c["selected"]) for c in doc["checks"]}
    assert statuses == {
        "tests": ("passed", True),
        "train_float32": ("failed", True),
        "train_bfloat16": ("skipped", True),
        "learner_flex_attention": ("skipped", False),
    }
    assert {"date", "command", "machine", "budget_s", "elapsed_s"} <= doc.keys()


# ------------------------------------------------------------------------- 1. tests


FAKE_TESTS = """
import pytest

def test_fake_cuda_within(record_property):
    record_property("grad_rel", 2.5e-6)
    record_property("grad_rel_max", 1e-4)
    record_property("note", "no bound: a figure only")

def test_fake_cuda_over(record_property):
    record_property("packed_vs_float32_log_prob_abs", 0.5)
    record_property("packed_vs_float32_log_prob_abs_max", 0.01)
    assert 0.5 <= 0.01, "packed is off"

@pytest.mark.skip(reason="needs two GPUs")
def test_fake_cuda_two_gpus():
    pass

def test_not_selected():
    assert False, "-k cuda leaves this out"
"""


def test_pytest_figures_outcomes_and_targets_from_junit(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (tmp_path / "test_fake.py").write_text(textwrap.dedent(FAKE_TESTS))
    junit = tmp_path / "junit.xml"
    cmd = gc.pytest_command(junit, str(tmp_path))
    proc = gc.run_process(cmd, 120, echo=False)
    got = gc.tests_check(proc, junit, cmd, 120)
    assert got.status == "failed"
    assert got.reason is not None and got.reason.startswith("1 failed or in error; first: ")
    assert "test_fake_cuda_over" in got.reason and "packed is off" in got.reason
    assert got.figures["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    cases = {c["test"].split("::")[1]: c for c in got.figures["tests"]}
    assert set(cases) == {"test_fake_cuda_within", "test_fake_cuda_over", "test_fake_cuda_two_gpus"}
    assert cases["test_fake_cuda_within"]["properties"] == {
        "grad_rel": 2.5e-6,
        "grad_rel_max": 1e-4,
        "note": "no bound: a figure only",
    }
    assert cases["test_fake_cuda_two_gpus"]["message"] == "needs two GPUs"
    targets = {t["name"].split("::")[1]: t for t in got.targets if "::" in t["name"]}
    within = targets["test_fake_cuda_within: grad_rel"]
    assert (within["measured"], within["target"], within["unit"], within["pass"]) == (
        2.5e-6,
        1e-4,
        "rel",
        True,
    )
    over = targets["test_fake_cuda_over: packed_vs_float32_log_prob_abs"]
    assert (over["unit"], over["pass"]) == ("nats", False)
    failed = next(t for t in got.targets if t["name"] == "CUDA tests failed or in error")
    assert (failed["measured"], failed["pass"]) == (1.0, False)
    assert check_targets(got.targets) == []


def junit_file(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


def proc(rc: int | None = 0, output: str = "", timed_out: bool = False) -> gc.Proc:
    return gc.Proc(rc, output, 1.0, timed_out)


def test_tests_check_passes_only_when_a_test_passed_and_none_failed(tmp_path: Path) -> None:
    ok = '<testcase classname="tests.test_x" name="test_a_cuda" time="1.5"/>'
    skip = '<testcase classname="tests.test_x" name="test_b_cuda"><skipped message="2 GPUs"/>'
    skip += "</testcase>"
    got = gc.tests_check(proc(0), junit_file(tmp_path, ok + skip), ["pytest"], 60)
    assert (got.status, got.reason) == ("passed", "1 passed, 1 skipped")
    assert got.figures["tests"][0]["test"] == "tests/test_x.py::test_a_cuda"
    all_skipped = gc.tests_check(proc(0), junit_file(tmp_path, skip), ["pytest"], 60)
    assert all_skipped.status == "failed"
    assert all_skipped.reason == "all 1 CUDA tests were skipped: 2 GPUs"
    none = gc.tests_check(proc(5), tmp_path / "absent.xml", ["pytest"], 60)
    assert none.status == "failed" and none.reason is not None
    assert none.reason.startswith("no test ran (exit status 5")
    late = gc.tests_check(proc(None, timed_out=True), junit_file(tmp_path, ok), ["pytest"], 60)
    assert (late.status, late.reason) == ("failed", "timed out after 60 s (stopped)")
    crashed = gc.tests_check(proc(1, "INTERNALERROR"), junit_file(tmp_path, ok), ["pytest"], 60)
    assert crashed.status == "failed" and "exit status 1: INTERNALERROR" in str(crashed.reason)


# ------------------------------------------------------------------------- learner


def learner_result(speedup: float = 1.5, pg_loss: float = 0.01, **memory: Any) -> dict:
    import learner

    flat = {"mode": "flat", "attn": "sdpa", "speedup": 1.0, "pass": None}
    packed = {"mode": "packed", "attn": "flex_attention", "speedup": speedup}
    rows = []
    for row in (flat, packed):
        row.update(
            device="cuda",
            trajectories=48,
            layers=30,
            sharing_ratio=1.6,
            target_speedup=1.28,
            tokens_per_s=50_000.0 * row["speedup"],
            wall_s=0.8,
            all_wall_s=[0.8, 0.8, 0.9],
            cpu_speedup=1.0,
            max_peak_gpu_memory_gb=3.2,
            pg_loss=pg_loss,
        )
        rows.append(row)
    packed["pass"] = speedup >= 1.28
    mem = [{"case": "flat, default config", "layers": 30, "config": {}, "device": "cuda"}]
    mem[0].update(memory)
    payload = {"throughput": rows, "memory": mem}
    payload["targets"] = learner.learner_targets(payload)
    return payload


def test_learner_check_figures_targets_and_failures() -> None:
    cmd = ["bench/learner.py"]
    good = gc.learner_check(
        "learner_flex_attention", proc(0), learner_result(peak_gpu_memory_gb=5.0), cmd, 60
    )
    assert good.status == "passed"
    assert good.reason == "packed 1.50x flat; target 1.28x met"
    assert good.figures["throughput"]["packed"]["max_peak_gpu_memory_gb"] == 3.2
    assert good.figures["memory"][0]["peak_gpu_memory_gb"] == 5.0
    (speed,) = good.targets  # no RSS target for a GPU memory row
    assert speed["name"].endswith("30 layers, flex_attention, CUDA") and speed["pass"]
    slow = gc.learner_check("l", proc(0), learner_result(speedup=1.1), cmd, 60)
    assert slow.status == "passed" and "missed (reported, not a failure)" in str(slow.reason)
    assert slow.targets[0]["pass"] is False
    nan = gc.learner_check("l", proc(0), learner_result(pg_loss=math.nan), cmd, 60)
    assert nan.status == "failed" and "flat: pg_loss nan" in str(nan.reason)
    oom = gc.learner_check("l", proc(0), learner_result(error=["OutOfMemoryError: x"]), cmd, 60)
    assert oom.status == "failed" and "memory, flat, default config" in str(oom.reason)
    crashed = gc.learner_check("l", proc(1, "Traceback\nRuntimeError: boom\n"), None, cmd, 60)
    assert (crashed.status, crashed.reason) == ("failed", "exit status 1: RuntimeError: boom")
    silent = gc.learner_check("l", proc(0), None, cmd, 60)
    assert silent.reason == "bench/learner.py wrote no result"


def test_learner_targets_keep_the_names_of_the_cpu_results() -> None:
    import learner

    stored = json.loads((ROOT / "bench" / "results" / "learner.json").read_text())
    names = [t["name"] for t in learner.learner_targets(stored)]
    assert names == [t["name"] for t in stored["targets"]]


def test_learner_refuses_a_missing_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import learner

    with pytest.raises(SystemExit) as exc:
        learner.main(["--device", "cuda", "--out", "/tmp/never.json"])
    assert exc.value.code == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err


# ------------------------------------------------------------------------- treegrpo train


def step_record(step: int, **change: float) -> dict[str, float]:
    record = {
        "step": step,
        "actor/pg_loss": -0.01,
        "actor/grad_norm": 0.5,
        "actor/entropy": 5.7,
        "critic/score/mean": 0.25,
        "actor/skipped_updates": 0.0,
        "timing_s/step": float(step),
        "timing_s/gen": 0.4,
    }
    return {**record, **change}


def test_train_check_from_a_run() -> None:
    worker = {"rc": 0, "peak_gpu_memory_gb": 0.7}
    records = [
        {"step": 0, "val-core/all/acc/mean@1": 0.0},
        step_record(1),
        step_record(2),
        step_record(3),
        {"step": 3, "val-core/all/acc/mean@1": 0.5},
    ]
    good = gc.train_check("train_float32", proc(0), worker, records, 3, ["x"], 60)
    assert (good.status, good.reason) == ("passed", "3 steps, median 2.0 s a step")
    assert [s["step"] for s in good.figures["steps"]] == [1, 2, 3]
    assert good.figures["validation"][1] == {"step": 3, "val-core/all/acc/mean@1": 0.5}
    assert good.figures["peak_gpu_memory_gb"] == 0.7
    assert good.targets[0]["measured"] == 3 and good.targets[0]["pass"]

    def reason(worker: Any, records: list[dict], p: gc.Proc | None = None) -> str | None:
        got = gc.train_check("t", p or proc(0), worker, records, 3, ["x"], 60)
        assert got.status == "failed"
        return got.reason

    short = reason(worker, records[:3])
    assert short == "steps logged [1, 2], expected 1..3"
    nan = reason(worker, [step_record(1), step_record(2, **{"actor/grad_norm": math.nan})])
    assert nan is not None and "step 2: actor/grad_norm missing or not finite" in nan
    assert reason({"rc": 2, "peak_gpu_memory_gb": 0.7}, records) == "treegrpo train exit status 2"
    assert reason(None, records) == "the worker reported nothing"
    late = reason(worker, records, proc(None, timed_out=True))
    assert late == "timed out after 60 s (stopped)"
    cpu = gc.train_check("t", proc(0), {"rc": 0, "peak_gpu_memory_gb": None}, records, 3, [], 60)
    assert cpu.status == "failed" and "did not use CUDA" in str(cpu.reason)
    assert cpu.targets[0]["measured"] is None  # not steps on CUDA


def test_read_metrics_leaves_out_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(step_record(1)) + "\n" + '{"step": 2, "actor/pg')
    assert [r["step"] for r in gc.read_metrics(path)] == [1]
    assert gc.read_metrics(tmp_path / "absent.jsonl") == []


# ------------------------------------------------------------------------- processes


def test_run_process_keeps_the_output_and_stops_at_its_limit(tmp_path: Path) -> None:
    log = (tmp_path / "log").open("w")
    code = "import sys, time; print('started', flush=True); sys.stdout.flush(); time.sleep(60)"
    start = time.monotonic()
    stopped = gc.run_process([sys.executable, "-c", code], 3, log=log, echo=False)
    log.close()
    assert stopped.timed_out and stopped.rc is None
    assert "started" in stopped.output and time.monotonic() - start < 30
    assert (tmp_path / "log").read_text() == "started\n"
    failed = gc.run_process([sys.executable, "-c", "raise SystemExit(3)"], 30, echo=False)
    assert (failed.rc, failed.timed_out) == (3, False)
    assert gc._ended(failed, 30) == "exit status 3: (no output)"


# ------------------------------------------------------------------------- --prepare


def test_prepare_pins_wheels_and_the_device_command(tmp_path: Path) -> None:
    pins = gc.pinned_versions(ROOT / "constraints.txt", gc.WHEEL_PINS)
    assert set(pins) == {"polars", "bm25s"}
    reqs = gc.wheels_to_carry(pins)
    assert f"polars-runtime-32=={pins['polars']}" in reqs and f"bm25s=={pins['bm25s']}" in reqs
    cmd = gc.wheel_download_command(reqs, tmp_path)
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-len(reqs) :] == reqs
    assert "--only-binary=:all:" in cmd and cmd[cmd.index("--python-version") + 1] == "3.12"
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)
    runtime = Path("polars_runtime_32-2.1.0-cp311-abi3-manylinux_2_17_x86_64.whl")
    assert gc._wheel_is(runtime, "polars-runtime-32==2.1.0")
    assert not gc._wheel_is(runtime, "polars==2.1.0")
    assert gc._wheel_is(Path("polars-2.1.0-py3-none-any.whl"), "polars==2.1.0")
    (tmp_path / "c.txt").write_text("numpy==2.0\n")
    with pytest.raises(SystemExit, match="pins no version of polars"):
        gc.pinned_versions(tmp_path / "c.txt", ("polars",))


def test_the_carried_extension_is_the_built_one_and_the_docs_give_the_command() -> None:
    import treegrpo._core

    assert Path(treegrpo._core.__file__).name == Path(gc.EXTENSION).name
    assert f"/{gc.WHEELS_DIR}/" in (ROOT / ".gitignore").read_text().splitlines()
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert gc.DEVICE_COMMAND in docs
    assert json.dumps(list(gc.CARRY)) in docs
    assert f"timeout_s={gc.DEVICE_TIMEOUT_S}" in docs
    # the checks' budget, plus installing the wheels and starting, fits the device call
    assert gc.DEFAULT_BUDGET_S + 60 <= gc.DEVICE_TIMEOUT_S <= 8 * 60


def test_the_device_run_selects_the_learner_tests_and_none_of_these(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-k", "cuda", "--collect-only", "-q"],
        cwd=ROOT,  # this Python's own treegrpo (the wheel under `make test`): no PYTHONPATH
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    chosen = [line for line in done.stdout.splitlines() if "::" in line]
    assert sum(line.startswith("tests/test_learner_cuda.py::") for line in chosen) == 5
    assert "tests/test_learner.py::test_flex_attention_packed_equals_flat_on_cuda" in chosen
    assert not any(line.startswith("tests/test_gpu_check.py") for line in chosen)
