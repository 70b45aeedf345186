"""2 gloo ranks that see different checkpoint folders (node-local / lagging storage): rank 0 sees steps 5
and 10 complete, rank 1 only step 5 (its step10 folder exists without COMPLETE: not yet visible as done).
Each rank writes the step ``agree_resume_step`` returned. With ``--missing`` rank 1 has no step10 folder at
all: every rank must raise the same one-line error instead of deadlocking.

    torchrun --nproc_per_node 2 tests/distributed/resume_worker.py OUT [--missing]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from nextlocmoe.model.io import RunError  # noqa: E402
from train.loop import Dist, agree_resume_step  # noqa: E402


def main() -> None:
    out, missing = Path(sys.argv[1]), "--missing" in sys.argv
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    run_dir = out / f"view{rank}"  # each rank its own view of the run folder
    for step in (5, 10):
        folder = run_dir / "checkpoints" / f"step{step}"
        if rank == 1 and step == 10 and missing:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0 or step == 5:
            (folder / "COMPLETE").write_text("{}")
    try:
        got: int | str = agree_resume_step(run_dir, Dist(rank, dist.get_world_size(), rank))
    except RunError as e:
        got = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
