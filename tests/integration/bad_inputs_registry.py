"""The bad-input matrix's registry: a ``Case`` per input (the command, its arguments, what it must say and
leave behind), registered by name with ``@case``; the cases live in bad_inputs_prepare.py and
bad_inputs_runs.py, the runner in test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration import bad_inputs_cases as bic

ROOT = bic.ROOT
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
PROGRAMS = {
    "nextlocmoe": [str(Path(sys.executable).with_name("nextlocmoe"))]
    if Path(sys.executable).with_name("nextlocmoe").is_file()
    else [sys.executable, "-m", "nextlocmoe.cli"],
    "train": [sys.executable, "train/train.py"],
    "export": [sys.executable, "export/export.py"],
    "bench": [sys.executable, "export/bench.py"],
}
PREP = ["prepare", "--history", "4", "--current", "2"]  # a sample needs 2 + 1 + 1 = 4 records per user
TRAIN = ["--config", "configs/debug.yaml", "--deepspeed", "ds_configs/zero2.json"]


@dataclass
class Case:
    prog: str
    argv: list[str]
    rc: int = 2
    says: tuple[str, ...] = ()  # in the one-line error (rc != 0) or in stdout + stderr (rc == 0)
    after: Callable[[], None] | None = None  # what must (not) be on disk afterwards
    files: list[Path] = field(default_factory=list)  # must not exist afterwards


CASES: dict[str, Callable[[Path, Callable[[], Path]], Case]] = {}


def case(fn: Callable[[Path, Callable[[], Path]], Case]) -> Callable:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def csv_case(tmp: Path, lines: list[str], rc: int, says: tuple, *extra: str, **kw) -> Case:
    src = bic.write_csv(tmp / "checkins.csv", lines, **kw)
    out = tmp / "out"
    return Case("nextlocmoe", [*PREP, "--dataset", "csv", "--source", str(src), "--out", str(out),
                               *bic.CSV_ARGS, *extra], rc, says, files=[] if rc == 0 else [out])  # fmt: skip


def manifest(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "manifest.json").read_text())
