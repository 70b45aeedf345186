"""The bad-input matrix (docs/DATA.md "Bad inputs"): every command a user runs, fed broken or unusual input
through its real entry (subprocess of the `nextlocmoe` script, train/train.py, export/export.py,
export/bench.py). Each case asserts the exit status, that stderr has no traceback, that an error is one
line naming the place (file, line, field, key, checkpoint step), and that nothing was left behind that a
later run would trust (no manifest.json / report / half-written folder). Success cases are documented
behaviour (e.g. rows dropped and counted, a previous prepare output replaced)."""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration import bad_inputs_cases as bic
from tests.integration import bad_inputs_prepare, bad_inputs_runs  # noqa: F401 - they register the cases
from tests.integration.bad_inputs_registry import CASES, ENV, PROGRAMS, ROOT, Case

pytestmark = [pytest.mark.integration]


# ---- the runner ----------------------------------------------------------------------------------------
WORKERS = max(1, min(4, os.cpu_count() or 1))  # the cases are independent processes: run them side by side


def _launch(c: Case) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAMS[c.prog], *c.argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Set up every selected case, launch them all (WORKERS at a time), return name -> (tmp, case, proc)."""
    names = sorted({it.callspec.params["name"] for it in request.session.items
                    if getattr(it, "originalname", "") == "test_bad_input"})  # fmt: skip
    base: list[Path] = []

    def run_copy(tmp: Path) -> Path:
        if not base:
            base.append(bic.make_run(tmp_path_factory.mktemp("base_run")))
        shutil.copytree(base[0], tmp / "run_copy")
        return tmp / "run_copy"

    cases = {}
    for name in names:
        tmp = tmp_path_factory.mktemp(name)
        cases[name] = (tmp, CASES[name](tmp, lambda tmp=tmp: run_copy(tmp)))
    with ThreadPoolExecutor(WORKERS) as pool:
        procs = {name: pool.submit(_launch, c) for name, (_, c) in cases.items()}
        return {name: (*cases[name], procs[name].result()) for name in names}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, outcomes: dict) -> None:
    tmp, c, p = outcomes[name]
    detail = f"rc={p.returncode}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, detail
    assert p.returncode == c.rc, detail
    if c.rc:
        errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1, detail
        print(f"[{name}] {errors[0]}")  # the message as users see it (pytest -s; docs/DATA.md table)
        for s in c.says:
            assert s in errors[0], f"{s!r} not in the error line {errors[0]!r}"
    else:
        for s in c.says:
            assert s in p.stdout + p.stderr, f"{s!r} not in the output\n{detail}"
    for f in c.files:
        assert not f.exists(), f"{f} left behind"
    if c.rc:  # a failed prepare leaves no temporary folder beside --out
        assert not [q.name for q in tmp.iterdir() if ".partial-" in q.name]
    if c.after is not None:
        assert c.after() is not False


def test_matrix_size() -> None:
    """The matrix covers every command (docs/DATA.md lists the same cases)."""
    assert len(CASES) >= 25
    assert {n.split("_")[0] for n in CASES} >= {"prepare", "evaluate", "explain", "tokenize", "train",
                                                "export", "bench"}  # fmt: skip
