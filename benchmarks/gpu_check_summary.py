"""The summary of benchmarks/gpu_check.sh: reads OUT_DIR/steps.tsv (what each step exited with),
each step's section of OUT_DIR/gpu_check.log and the JSON the steps wrote; decides each step's
status, picks a key number, prints a one-screen table and writes OUT_DIR/summary.json.

    python3 benchmarks/gpu_check_summary.py OUT_DIR [--dry-run]

Status: SKIP (not run), TIMEOUT (killed at its cap: exit 124 or 137), FAIL (non-zero exit, or an
exit 0 that did not do its job: a GPU test step that passed no test, a benchmark without its JSON,
a sanitizer run without a clean error summary), PASS otherwise. Exits 1 when any step is FAIL or
TIMEOUT, else 0.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys

PYTEST_STEPS = ("tests_cuda", "tests_triton")
SANITIZER_STEPS = ("memcheck", "racecheck")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_OF = {"ops": "ops.json", "fps": "fps.json", "fps_graphs": "fps_graphs.json"}


def pytest_counts(text: str) -> dict | None:
    """The counts of pytest's closing line ("3 failed, 10 passed, 2 skipped in 4.2s")."""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|skipped|deselected|error|errors|no tests ran)\b", ln)
             and re.search(r"\bin [0-9.]+s\b", ln)]
    if not lines:
        return None
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "deselected")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1]):
        key = "errors" if word.startswith("error") else word
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def judge(step: str, rc: str, text: str, out_dir: str, dry: bool) -> tuple[str, str]:
    """(status, key number) of one step."""
    if rc == "skip":
        reason = next((ln[len("SKIP: "):] for ln in text.splitlines() if ln.startswith("SKIP: ")), "")
        return "SKIP", reason
    code = int(rc)
    if code in (124, 137):
        return "TIMEOUT", "killed at its cap"
    status = "PASS" if code == 0 else "FAIL"
    key = "" if code == 0 else f"exit {code}"
    if step in PYTEST_STEPS:
        c = pytest_counts(text)
        if c is None:
            return "FAIL", key or "no pytest summary line"
        key = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        # On a GPU a test step that ran nothing (no device seen, say) has checked nothing.
        if status == "PASS" and not dry and c["passed"] == 0:
            status, key = "FAIL", key + " (no test ran)"
    elif step in SANITIZER_STEPS:
        m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        cases = re.findall(r"sanitizer_cases: (\d+) cases, (\d+) failed", text)
        errors = int(m[-1]) if m else None
        key = (f"{errors if errors is not None else '?'} sanitizer errors"
               + (f", {cases[-1][0]} cases, {cases[-1][1]} failed" if cases else ""))
        if status == "PASS" and (errors != 0 or not cases):
            status = "FAIL"
    elif step in JSON_OF:
        path = os.path.join(out_dir, JSON_OF[step])
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            return "FAIL", (key + "; " if key else "") + f"no JSON ({type(e).__name__})"
        key = ((key + "; ") if key else "") + (ops_key(data) if step == "ops" else fps_key(data))
        if step == "ops" and not data.get("rows"):
            status = "FAIL"
    elif step == "build":
        m = re.search(r"^dry run: (.*)$", text, re.MULTILINE)
        key = m.group(1) if m else key
        if code == 0 and not glob.glob(os.path.join(REPO, "armnet_ops", "_C*.so")):
            status, key = "FAIL", "no armnet_ops/_C*.so"
    elif step == "info" and code == 0:
        torch_v = re.search(r"^torch\s+(\S+)", text, re.MULTILINE)
        ext = re.search(r"^extension\s+(.*)$", text, re.MULTILINE)
        key = f"torch {torch_v.group(1) if torch_v else '?'}; extension: {ext.group(1) if ext else '?'}"
        if ext is None or ext.group(1).strip() != "loaded":
            status = "FAIL"
    return status, key


def ops_key(data: dict) -> str:
    """Row count, and the criss-cross goal of issue 17: each kernel backend's forward and
    forward+backward speed-up over the einsum at [2,512,97,97] bf16, where measured."""
    rows = data.get("rows", [])
    backends = sorted({r.get("backend", "?") for r in rows})
    key = f"{len(rows)} rows, backends {','.join(backends)}"
    goal = [r for r in rows if r.get("shape", "").startswith("[2,512,97,97]")
            and r.get("dtype") == "bfloat16" and r.get("backend") in ("cuda", "triton")
            and "fwd_vs_einsum" in r]
    for r in goal:
        key += f"; {r['backend']} {r['fwd_vs_einsum']}x/{r['fwd_bwd_vs_einsum']}x einsum"
    return key


def fps_key(data: dict) -> str:
    runs = data.get("runs", [])
    parts = [f"{r['ops_backend']} {r['fps']:.2f} fps" for r in runs]
    if "speedup_auto_over_reference" in data:
        parts.append(f"x{data['speedup_auto_over_reference']:.2f}")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    with open(os.path.join(args.out_dir, "gpu_check.log"), errors="replace") as f:
        log = f.read().splitlines()
    with open(os.path.join(args.out_dir, "steps.tsv")) as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    rows = []
    for s in steps:
        text = "\n".join(log[int(s["first_line"]) - 1:int(s["last_line"])])
        status, key = judge(s["step"], s["rc"], text, args.out_dir, args.dry_run)
        rows.append(dict(step=s["step"], status=status, seconds=int(s["seconds"]), cap=int(s["cap"]),
                         key=key))
    bad = [r["step"] for r in rows if r["status"] in ("FAIL", "TIMEOUT")]
    summary = dict(mode="dry-run" if args.dry_run else "gpu", steps=rows,
                   total_seconds=sum(r["seconds"] for r in rows), failed=bad, ok=not bad)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")

    width = max(len(r["step"]) for r in rows)
    print(f"\ngpu_check summary ({summary['mode']}, {args.out_dir})")
    print(f"{'step':{width}s}  {'status':7s}  {'s':>4s}  {'cap':>4s}  key")
    for r in rows:
        print(f"{r['step']:{width}s}  {r['status']:7s}  {r['seconds']:4d}  {r['cap']:4d}  {r['key'][:90]}")
    print(f"{'total':{width}s}  {'FAIL' if bad else 'PASS':7s}  {summary['total_seconds']:4d}"
          + (f"        failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
