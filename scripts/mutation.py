"""Mutation testing of the modules whose numbers the experiments report (run by hand).

Each target is a set of modules and the tests that should pin them down. For each,
the script copies the repository into a scratch folder, runs mutmut there (so the
checkout is never touched), and prints a Markdown report: mutants killed, survived,
not covered by the selected tests, timed out, and the diff of every survivor.

  .venv/bin/python scripts/mutation.py                   # every target
  .venv/bin/python scripts/mutation.py imbalance orders  # some of them
  .venv/bin/python scripts/mutation.py --list

Too slow for CI on 2 cores (minutes to an hour per target); the last report is in
docs/testing.md. Installs mutmut into the running environment if it is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = "mutmut==3.8.1"

# name -> (modules to mutate, tests that should kill their mutants, what it covers)
TARGETS = {
    "imbalance": (["psm/imbalance.py"], ["tests/test_imbalance.py"],
                  "imbalance statistics (raw and difficulty-controlled trend, bins, records)"),
    "orders": (["psm/data/orders.py"], ["tests/test_orders.py"],
               "the K data orders and first-epoch positions"),
    # The body-level tests run eagerly in a second; the kernel-level tests recompile the
    # merge kernels for every mutant (about a minute each here), so they are not used.
    "sampler": (["psm/merge/kernels.py"], ["tests/test_merge_sampler.py"],
                "selection and resampling draws (the functions those tests reach)"),
    "checkpoint": (["psm/training/checkpoint.py"], ["tests/test_checkpoint.py", "tests/test_resume.py"],
                   "checkpoint save/restore and resume"),
    "scorers": (["psm/evaluation/glue.py", "psm/evaluation/gsm8k.py"],
                ["tests/test_eval_glue.py", "tests/test_eval_gsm8k.py",
                 "tests/test_paper_tasks.py"],
                "GLUE metrics and GSM8K answer extraction / scoring"),
}
COPY = ("psm", "configs", "tests", "pyproject.toml")


def _ensure_mutmut() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mutmut")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", MUTMUT], check=True)
    return exe


def _setup_cfg(modules: list[str], tests: list[str]) -> str:
    def listing(items):
        return "\n".join(f"    {x}" for x in items)
    # forkserver: the main process has run the tests once for coverage stats, and JAX's
    # compilation caches in it hold the unmutated code; forking workers from it would
    # run that code for every mutant of a jitted path.
    return (
        "[mutmut]\n"
        "source_paths=\n    psm\n"
        "also_copy=\n    configs\n"
        f"only_mutate=\n{listing(modules)}\n"
        f"pytest_add_cli_args_test_selection=\n{listing(tests)}\n"
        "pytest_add_cli_args=\n    -p\n    no:cacheprovider\n    -p\n    no:xdist\n    -x\n"
        "process_isolation=forkserver\n"
        f"max_children={os.cpu_count() or 1}\n")


def _run_target(name: str, scratch: str, mutmut: str) -> dict:
    modules, tests, covers = TARGETS[name]
    work = os.path.join(scratch, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    for item in COPY:
        src = os.path.join(REPO, item)
        dst = os.path.join(work, item)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    with open(os.path.join(work, "setup.cfg"), "w") as f:
        f.write(_setup_cfg(modules, tests))
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=work, CI="")
    run = subprocess.run([mutmut, "run"], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    results = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True)
    status: dict[str, list[str]] = {}
    for line in results.stdout.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status.setdefault(m.group(2).strip(), []).append(m.group(1))
    diffs = {}
    for mutant in status.get("survived", []):
        shown = subprocess.run([mutmut, "show", mutant], cwd=work, env=env,
                               capture_output=True, text=True)
        diffs[mutant] = shown.stdout.strip()
    return {"name": name, "modules": modules, "tests": tests, "covers": covers,
            "seconds": seconds, "status": status, "diffs": diffs,
            "returncode": run.returncode, "log_tail": (run.stdout + run.stderr)[-2000:]}


def _report(results: list[dict]) -> str:
    out = ["| target | modules | tests | killed | survived | no tests | timeout | other | "
           "minutes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["status"]
        counted = {"killed", "survived", "no tests", "timeout"}
        other = sum(len(v) for k, v in s.items() if k not in counted)
        out.append(f"| {r['name']} | {', '.join(r['modules'])} | {' '.join(r['tests'])} | "
                   f"{len(s.get('killed', []))} | {len(s.get('survived', []))} | "
                   f"{len(s.get('no tests', []))} | {len(s.get('timeout', []))} | {other} | "
                   f"{r['seconds'] / 60:.1f} |")
    for r in results:
        if r["returncode"] != 0 and not r["status"]:
            out += ["", f"### {r['name']}: mutmut failed", "```", r["log_tail"], "```"]
        if r["diffs"]:
            out += ["", f"### Surviving mutants: {r['name']}"]
            for mutant, diff in r["diffs"].items():
                out += ["", f"`{mutant}`", "```diff", diff, "```"]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"some of {list(TARGETS)} (default: all)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(),
                                                          "psm-mutation"),
                        help="folder for the scratch copies (default: %(default)s)")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    args = parser.parse_args()
    if args.list:
        for name, (modules, tests, covers) in TARGETS.items():
            print(f"{name:11s} {covers}\n{'':11s} mutates {', '.join(modules)}; "
                  f"tests {' '.join(tests)}")
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {list(TARGETS)}")
    mutmut = _ensure_mutmut()
    results = []
    for name in args.targets or list(TARGETS):
        print(f"mutating {name} ...", file=sys.stderr, flush=True)
        results.append(_run_target(name, args.scratch, mutmut))
        print(_report(results[-1:]), file=sys.stderr, flush=True)
    text = _report(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
