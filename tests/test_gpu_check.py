"""benchmarks/gpu_check.sh, the one command for a lent GPU, kept from rotting: its dry run (the
same steps on the CPU with tiny shapes) must pass here, a failing or hanging step must show in the
summary and the exit code without stopping the steps after it, and its summary must not call a
GPU step that checked nothing a pass. benchmarks/sanitizer_cases.py runs on the C++ backend."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = ["build", "info", "tests_cuda", "tests_triton", "memcheck", "racecheck", "ops", "fps",
         "fps_graphs"]


def run_check(out, *args, env=None, timeout=1500):
    full_env = {**os.environ, **(env or {})}
    for var in ("GPU_CHECK_STEPS", "GPU_CHECK_FAIL", "GPU_CHECK_HANG", "GPU_CHECK_CAPS"):
        if env is None or var not in env:
            full_env.pop(var, None)
    return subprocess.run(["bash", SCRIPT, *args, str(out)], cwd=ROOT, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def statuses(out):
    with open(os.path.join(out, "summary.json")) as f:
        return {s["step"]: s["status"] for s in json.load(f)["steps"]}


def table_rows(stdout):
    """{step: status} read off the printed table, which must come last."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("gpu_check summary"))
    rows = {}
    for ln in lines[start + 2:]:
        parts = ln.split()
        rows[parts[0]] = parts[1]
    assert "total" in rows, "the summary table must be the last thing printed"
    return rows


def test_dry_run_passes_and_writes_few_files(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = run_check(out, "--dry-run")
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    expected = {s: "PASS" for s in STEPS} | {"memcheck": "SKIP", "racecheck": "SKIP"}
    assert statuses(out) == expected
    rows = table_rows(res.stdout)
    assert {s: rows[s] for s in STEPS} == expected and rows["total"] == "PASS"
    # What the device tool brings back: at most 8 files, at most 2 folders deep.
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert 0 < len(files) <= 8, files
    assert all(len(f.split(os.sep)) <= 2 for f in files), files
    assert {"gpu_check.log", "steps.tsv", "summary.json", "ops.json", "fps.json",
            "fps_graphs.json"} <= set(files)
    with open(out / "fps.json") as f:
        fps = json.load(f)
    assert [r["ops_backend"] for r in fps["runs"]] == ["auto", "reference"]
    with open(out / "ops.json") as f:
        assert json.load(f)["rows"]
    print(f"dry run took {elapsed:.0f} s")


def test_failing_step_fails_the_run_and_later_steps_still_run(tmp_path):
    res = run_check(tmp_path, "--dry-run", env={"GPU_CHECK_STEPS": "build,info",
                                                "GPU_CHECK_FAIL": "build"})
    assert res.returncode != 0
    got = statuses(tmp_path)
    assert got["build"] == "FAIL" and got["info"] == "PASS"
    assert all(got[s] == "SKIP" for s in STEPS if s not in ("build", "info"))
    rows = table_rows(res.stdout)
    assert rows["build"] == "FAIL" and rows["total"] == "FAIL"
    assert "injected failure" in (tmp_path / "gpu_check.log").read_text()


def test_hanging_step_is_killed_at_its_cap(tmp_path):
    t0 = time.monotonic()
    res = run_check(tmp_path, "--dry-run", env={"GPU_CHECK_STEPS": "build,info",
                                                "GPU_CHECK_HANG": "build",
                                                "GPU_CHECK_CAPS": "build=3"})
    assert res.returncode != 0
    got = statuses(tmp_path)
    assert got["build"] == "TIMEOUT" and got["info"] == "PASS"
    with open(tmp_path / "summary.json") as f:
        build = next(s for s in json.load(f)["steps"] if s["step"] == "build")
    assert build["seconds"] <= 3 + 12 and build["cap"] == 3  # TERM at the cap, KILL 10 s later
    assert time.monotonic() - t0 < 300


def test_usage_error_without_out_dir():
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def _fake_run(out, step, rc, section):
    (out / "gpu_check.log").write_text(f"===== {step} =====\n{section}\n")
    (out / "steps.tsv").write_text("step\trc\tseconds\tcap\tfirst_line\tlast_line\n"
                                   f"{step}\t{rc}\t5\t60\t1\t{2 + section.count(chr(10))}\n")


@pytest.mark.parametrize("step,section,dry,status", [
    ("tests_cuda", "===== 120 skipped in 3.1s =====", False, "FAIL"),   # no GPU seen: nothing ran
    ("tests_cuda", "===== 120 skipped in 3.1s =====", True, "PASS"),    # expected on a CPU
    ("tests_triton", "===== 3 passed, 1 skipped in 3.1s =====", False, "PASS"),
    ("tests_triton", "no closing line", False, "FAIL"),
    ("memcheck", "sanitizer_cases: 40 cases, 0 failed, 9.0 s on cuda\n"
                 "========= ERROR SUMMARY: 2 errors", False, "FAIL"),
    ("memcheck", "sanitizer_cases: 40 cases, 0 failed, 9.0 s on cuda\n"
                 "========= ERROR SUMMARY: 0 errors", False, "PASS"),
    ("racecheck", "========= ERROR SUMMARY: 0 errors", False, "FAIL"),  # the driver never ran
    ("ops", "wrote nothing", False, "FAIL"),                            # no JSON
])
def test_summary_judges_what_a_step_did(tmp_path, step, section, dry, status):
    _fake_run(tmp_path, step, 0, section)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check_summary.py"),
                          str(tmp_path), *(["--dry-run"] if dry else [])], capture_output=True, text=True)
    assert statuses(tmp_path)[step] == status, res.stdout
    assert res.returncode == (0 if status == "PASS" else 1)


def test_summary_timeout_and_failure_codes(tmp_path):
    for rc, status in [(124, "TIMEOUT"), (137, "TIMEOUT"), (1, "FAIL")]:
        _fake_run(tmp_path, "fps", rc, "...")
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check_summary.py"),
                        str(tmp_path)], capture_output=True, text=True)
        assert statuses(tmp_path)["fps"] == status


def test_sanitizer_cases_run_on_the_cpu_backend():
    """The driver the sanitizer runs on a GPU, here on the C++ kernels: every case is called and
    compared with the float64 reference."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sanitizer_cases.py"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert ", 0 failed" in res.stdout
    ok = [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    for name in ("criss_cross_attention residual", "cca_weight", "cca_map", "carafe ", "carafe_fused",
                 "odd offset", "directional_conv2d ", "directional_conv2d_pair"):
        assert any(name in ln for ln in ok), f"no case of {name!r} ran"


# Runs a benchmark script as `python3 benchmarks/X.py` would, with any installed armnet_ops
# (an editable install's finder or path entry) hidden: only the checkout itself may serve it.
_NOT_INSTALLED = r"""
import importlib.util, os, runpy, sys
root, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p and os.path.abspath(p) != root
            and not os.path.isdir(os.path.join(p, "armnet_ops"))]
assert importlib.util.find_spec("armnet_ops") is None, "could not hide the installed armnet_ops"
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script,args", [
    ("ops.py", ["--smoke", "--op", "dconv", "--json", "{tmp}/ops.json"]),
    ("fps.py", ["--model", "armnet_tiny", "--resolution", "32", "32", "--warmup", "1", "--iters",
                "1", "--device", "cpu", "--json", "{tmp}/fps.json"]),
    ("sanitizer_cases.py", ["--device", "cpu"]),
])
def test_benchmark_scripts_run_from_a_checkout_without_an_install(tmp_path, script, args):
    """The GPU check builds the extension in place and installs nothing (the device machine has
    no armnet_ops installed), then runs these scripts by path: each must find the checkout's
    package itself."""
    path = os.path.join(ROOT, "benchmarks", script)
    res = subprocess.run([sys.executable, "-c", _NOT_INSTALLED, ROOT, path,
                          *[a.format(tmp=tmp_path) for a in args]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def test_time_ms_interleaved_alternates_the_functions(monkeypatch):
    """ops.py times the backends of a shape in alternating rounds, so that a drifting machine
    slows them alike: each round runs every function its share of the repetitions, in turn."""
    import torch
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import common
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = common.time_ms_interleaved(fns, torch.device("cpu"), warmup=1, reps=4, rounds=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2


def test_rounds_pair_the_calls_and_give_the_ratio_spread(monkeypatch):
    """On a CPU ops.py keeps each round's calls (time_rounds_interleaved) and records, beside the
    ratio of the medians, the quartiles of the einsum's ratio round by round: in round i the
    einsum's median over the backend's, then the quartiles of those (exclusive method)."""
    import torch
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import common
    import ops
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    rounds = common.time_rounds_interleaved(fns, warmup=0, reps=3, rounds=3)
    assert order == ["a", "b"] * 3 and [len(r) for r in rounds.values()] == [3, 3]
    peer = [[2.0], [4.0, 4.0], [6.0], [8.0], [10.0]]
    mine = [[1.0], [1.0, 3.0], [1.0], [1.0], [1.0]]  # round 2: medians 4 and 2
    # ratios 2, 2, 6, 8, 10: q1 halfway between the 1st and 2nd, q3 between the 4th and 5th
    assert common.paired_ratio_quartiles(peer, mine) == [2.0, 9.0]
    case = ops.Case("criss_cross_attention", "tiny", dict(N=1, C=3, Cqk=2, H=5, W=6))
    rows = ops.measure(case, ["einsum", "cpu"], torch.device("cpu"), torch.float32, smoke=True)
    ops.add_ratios(rows)
    for row in rows:  # one round in a smoke run: both quartiles are that round's ratio
        for key in ("fwd", "fwd_bwd"):
            q1, q3 = row[f"{key}_vs_einsum_q1_q3"]
            assert q1 == q3 and abs(q1 - row[f"{key}_vs_einsum"]) <= 0.011, row


def test_gpu_grid_times_the_module_layout_last(monkeypatch):
    """The criss-cross GPU grid: the goal shapes in NCHW first (a time-boxed GPU check measures
    those before anything else), then CCNet's shape in channels_last, the layout
    CrissCrossAttention's projections hand the op, with channels_last inputs and the channels_last
    traffic model; the CPU grid has no such row."""
    import torch
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import ops
    from traffic import cca_cuda_traffic
    grid = ops.cases("full", torch.device("cuda"), {"cca"})
    assert [c.shape.get("channels_last") for c in grid] == [False] * len(ops.CCA_GPU) + [True]
    last = grid[-1]
    assert last.label.endswith(" cl") and (last.shape["H"], last.shape["W"]) == (97, 97)
    args, _ = last.inputs(torch.device("cpu"), torch.float32)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in args)
    cpu_grid = ops.cases("quick", torch.device("cpu"), {"cca"})
    assert not any(c.shape.get("channels_last") for c in cpu_grid)
    # the two layouts differ by the transposes to NHWC in the model
    nchw = cca_cuda_traffic(2, 64, 512, 97, 97, 2)
    cl = cca_cuda_traffic(2, 64, 512, 97, 97, 2, channels_last=True)
    assert nchw["bytes"] - cl["bytes"] == 2 * 2 * 97 * 97 * (2 * 64 + 512) * 2
