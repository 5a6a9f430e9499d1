"""Tests for psm.evaluation.humaneval and the sandbox it runs code in."""

import fractions
import json
import math
import os
import textwrap

import numpy as np
import pytest

from psm.evaluation import humaneval, sandbox

MODES = [
    "none",
    pytest.param("namespaces", marks=pytest.mark.skipif(
        not sandbox.isolation_available(),
        reason="'unshare --net --pid' does not work on this machine")),
]


@pytest.fixture(scope="module")
def problems(shared_data_dir):
    problems = humaneval.load_problems(
        os.path.join(shared_data_dir, "humaneval", "HumanEval.jsonl.gz"))
    assert len(problems) == 164
    return problems


@pytest.mark.slow
def test_all_canonical_solutions_pass(problems):
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    result = humaneval.evaluate(problems, samples, ks=(1,), workers=2)
    failed = [(r["id"], r["status"], r["detail"]) for r in result["per_example"]
              if not r["correct"]]
    assert failed == []
    assert result["pass_at_k"] == {"pass@1": 1.0}
    assert result["num_problems"] == 164 and result["num_samples"] == 164
    json.dumps(result)  # results go to eval.json as they are


def test_trivially_wrong_completions_fail(problems):
    task_ids = list(problems)[::8]  # 21 problems spread over the set
    samples = [{"task_id": t, "completion": "    return None\n"} for t in task_ids]
    samples += [{"task_id": "HumanEval/0", "completion": "    return (\n"},  # syntax error
                {"task_id": "HumanEval/0", "completion": "    raise NotImplementedError\n"},
                {"task_id": "HumanEval/0", "completion": "    return False\n"}]
    result = humaneval.evaluate(problems, samples, ks=(1,), workers=2)
    assert [r["correct"] for r in result["per_example"]] == [False] * len(samples)
    assert result["pass_at_k"]["pass@1"] == 0.0
    details = [r["detail"] for r in result["per_example"][-3:]]
    assert "SyntaxError" in details[0] and "NotImplementedError" in details[1]
    assert "AssertionError" in details[2]


def _sandbox_processes(marker):
    """Pids of live processes whose command line mentions `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


VICTIM_TEXT = "precious data\n"


def _hostile_cases(victim, victim_dir):
    # Function bodies (run when check() calls the function) or module-level
    # code (after a dedent), each followed by nothing that could pass the tests.
    return {
        "infinite_loop": "    while True:\n        pass\n",
        "fork_bomb": "    import os\n    while True:\n        os.fork()\n",
        "fork_bomb_posix": "    import posix\n    while True:\n        posix.fork()\n",
        "subprocess": "    import subprocess\n    subprocess.run(['sh', '-c', 'sleep 100'])\n",
        # The module stubs are the first layer; re-importing reaches the audit hook.
        "subprocess_reimported": "import sys\ndel sys.modules['subprocess']\n"
                                 "import subprocess\nsubprocess.run(['true'])\n",
        "os_system": "    import os\n    os.system('sleep 100')\n",
        "memory_bomb": "    x = bytearray(1 << 40)\n",
        # bytes(n) maps zeroed pages without touching them, so the address-space
        # limit stops it at once; a bytearray would first write every page, and a
        # VM that backs fresh memory slowly (~100 MB/s seen) can take longer than
        # the timeout to reach the limit.
        "memory_growth": "    a = []\n    while True:\n        a.append(bytes(1 << 24))\n",
        "delete_outside": f"import os\nos.remove({victim!r})\n",
        "delete_outside_posix": f"import posix\nposix.unlink({victim!r})\n",
        "rmtree_outside": f"import shutil\nshutil.rmtree({victim_dir!r})\n",
        "overwrite_outside": f"open({victim!r}, 'w').write('pwned')\n",
        "truncate_outside": f"import os\nos.open({victim!r}, os.O_WRONLY | os.O_TRUNC)\n",
        "rename_outside": f"import os\nos.rename({victim!r}, 'stolen.txt')\n",
        "symlink_escape": f"import os\nos.symlink({victim!r}, 'link')\n"
                          "open('link', 'w').write('pwned')\n",
        "dir_fd_escape": f"import os\nfd = os.open({victim_dir!r}, os.O_RDONLY)\n"
                         f"os.unlink({os.path.basename(victim)!r}, dir_fd=fd)\n",
        "many_files": "for i in range(100000):\n    open(f'f{i}', 'w').write('x' * 1000)\n",
        "huge_file": "open('big', 'wb').write(b'x' * (100 << 20))\n",
        "stdout_spam": "while True:\n    print('x' * 10000)\n",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
        "network_reimported": "import sys\ndel sys.modules['socket']\nimport socket\n"
                              "socket.socket()\n",
        "network_raw": "import _socket\n_socket.socket()\n",
        "read_stdin": "    data = input()\n    return bool(data)\n",
        "read_stdin_buffer": "import sys\nsys.stdin.read()\nraise SystemExit(0)\n",
        "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
        "kill_parent_posix": "import posix\nposix.kill(posix.getppid(), 9)\n",
        "kill_group": "import os\nos.killpg(0, 9)\n",
        "ctypes": "import ctypes\nctypes.CDLL(None).fork()\n",
    }


@pytest.mark.parametrize("isolation", MODES)
def test_hostile_completions_fail_cleanly(problems, tmp_path, isolation):
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    victim = victim_dir / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    sandbox_root = tmp_path / "sandboxes"
    sandbox_root.mkdir()
    problem = problems["HumanEval/0"]
    timeout_s = 4.0
    my_pid = os.getpid()
    for name, completion in _hostile_cases(str(victim), str(victim_dir)).items():
        result = humaneval.score(completion, problem, timeout_s=timeout_s, memory_mb=512,
                                 isolation=isolation, tmp_root=str(sandbox_root))
        assert not result["correct"], (name, result)
        if name == "infinite_loop":
            assert result["status"] == "timed_out", (name, result)
        else:
            # Failed by a guard or a limit, not by waiting out the clock.
            assert result["status"] == "failed", (name, result)
            assert result["elapsed_s"] < timeout_s, (name, result)
        assert os.getpid() == my_pid  # still here: the parent was not killed
        assert victim.read_text() == VICTIM_TEXT, name
        assert sorted(os.listdir(victim_dir)) == ["victim.txt"], name
        assert _sandbox_processes(str(sandbox_root)) == [], name  # nothing left running
        assert os.listdir(sandbox_root) == [], name  # temporary directory removed


@pytest.mark.parametrize("isolation", MODES)
def test_premature_exit_with_status_zero_is_failure(problems, isolation):
    problem = problems["HumanEval/0"]
    for exit_code in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                      "raise SystemExit\n"):
        # A correct function, then an exit before check() can run.
        completion = problem["canonical_solution"] + "\n\n" + exit_code
        program = humaneval.build_program(problem, completion)
        raw = sandbox.run_program(program, timeout_s=5, isolation=isolation)
        assert raw.returncode == 0 and not raw.passed and raw.status == "failed", raw
        assert not humaneval.score(completion, problem, isolation=isolation)["correct"]
    # The same correct function without the exit passes.
    assert humaneval.score(problem["canonical_solution"], problem,
                           isolation=isolation)["correct"]


def test_guarded_attempt_leaves_file_and_correct_code_still_passes(problems, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    problem = problems["HumanEval/0"]
    # Swallows the guard's error, then solves the task: the answer is right, so
    # it passes, but the write never happened.
    completion = textwrap.indent(textwrap.dedent(f"""\
        try:
            open({str(victim)!r}, 'w').write('pwned')
        except PermissionError:
            pass
        """), "    ") + problem["canonical_solution"]
    assert humaneval.score(completion, problem)["correct"]
    assert victim.read_text() == VICTIM_TEXT


def test_sandbox_allows_work_inside_its_directory():
    program = textwrap.dedent("""\
        import os, threading
        with open("scratch.txt", "w") as f:
            f.write("ok")
        os.mkdir("sub")
        os.rename("scratch.txt", "sub/moved.txt")
        assert open("sub/moved.txt").read() == "ok"
        os.remove("sub/moved.txt")
        os.rmdir("sub")
        print("hello")
        """)
    result = sandbox.run_program(program, timeout_s=10)
    assert result.passed and result.status == "passed", result
    assert result.stdout == "hello\n"
    json.dumps(result.to_dict())


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = sandbox.run_program("while True:\n    pass\n", timeout_s=20, cpu_s=1)
    assert result.status == "failed" and result.elapsed_s < 10, result


def _pass_at_k_exact(n, c, k):
    return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 16):
        for c in range(n + 1):
            assert humaneval.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
            for k in range(1, n + 1):
                exact = float(_pass_at_k_exact(n, c, k))
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # Large n, where the binomial coefficients overflow float64 (C(1000, 500) ~ 1e299
    # and beyond for larger n), the product form stays accurate.
    for n, c, k in [(2000, 3, 1000), (2000, 1990, 5), (5000, 17, 100)]:
        exact = float(_pass_at_k_exact(n, c, k))
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    per_problem = humaneval.estimate_pass_at_k([10, 10, 5], [0, 3, 5], 2)
    np.testing.assert_allclose(per_problem, [0.0, float(_pass_at_k_exact(10, 3, 2)), 1.0])
    np.testing.assert_allclose(humaneval.estimate_pass_at_k(4, [1, 2], 1), [0.25, 0.5])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        humaneval.pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        humaneval.pass_at_k(3, 4, 1)


def test_evaluate_aggregates_several_samples_per_task(problems):
    good = {t: problems[t]["canonical_solution"] for t in ("HumanEval/0", "HumanEval/2")}
    bad = "    return None\n"
    samples = [{"task_id": "HumanEval/0", "completion": c}
               for c in (good["HumanEval/0"], bad, good["HumanEval/0"])]
    samples += [{"task_id": "HumanEval/2", "completion": c}
                for c in (bad, bad, good["HumanEval/2"])]
    result = humaneval.evaluate(problems, samples, ks=(1, 2, 3, 4), workers=2)
    # Task 0: 2 of 3 correct; task 2: 1 of 3 correct.
    # pass@1 = (2/3 + 1/3) / 2; pass@2 = (1 + (1 - C(2,2)/C(3,2))) / 2; pass@3 = 1.
    assert result["pass_at_k"]["pass@1"] == pytest.approx(0.5)
    assert result["pass_at_k"]["pass@2"] == pytest.approx((1 + (1 - 1 / 3)) / 2)
    assert result["pass_at_k"]["pass@3"] == pytest.approx(1.0)
    assert result["skipped_k"] == [4]
    assert [(r["id"], r["sample"], r["correct"]) for r in result["per_example"]] == [
        ("HumanEval/0", 0, True), ("HumanEval/0", 1, False), ("HumanEval/0", 2, True),
        ("HumanEval/2", 0, False), ("HumanEval/2", 1, False), ("HumanEval/2", 2, True)]
    with pytest.raises(ValueError, match="sample 0 names unknown task 'nope'"):
        humaneval.evaluate(problems, [{"task_id": "nope", "completion": ""}])


def test_truncate_completion_and_build_program(problems):
    text = "    return 1\n\ndef helper():\n    pass\n"
    assert humaneval.truncate_completion(text) == "    return 1\n"
    assert humaneval.truncate_completion("    return 1\n") == "    return 1\n"
    assert humaneval.truncate_completion("    x = 1\n# note\nprint(x)") == "    x = 1"
    problem = problems["HumanEval/0"]
    program = humaneval.build_program(problem, "    return True\n")
    assert program.startswith(problem["prompt"] + "    return True\n")
    assert program.rstrip().endswith("check(has_close_elements)")
    assert problem["test"] in program
