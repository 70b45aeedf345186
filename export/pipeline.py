"""The export pipeline behind ``export/export.py``: load a run -> freeze -> ONNX (-> TensorRT) -> parity
against the eager model (+ scipy KD-tree ranking) on held-out samples at batch sizes other than the
export example's -> ``export_report.json`` and what the benchmark needs.

Engine folder: ``model.onnx`` (+ ``model.onnx.data`` when large), ``frozen.pt2`` (the exported program,
for the torch backends), ``frozen.json`` (input/output names, routing, ranking, precision, run),
``locations.npy`` (normalised location table), ``sample_inputs.npz`` (held-out inputs), ``model.plan``
(TensorRT, when built), ``export_report.json``, and what serving needs (``serving.json``, ``venues.npz``:
``nextlocmoe.serve.engine``, docs/SERVING.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import onnx_io, samples, trt
from export.backends import FROZEN_META, FROZEN_PROGRAM, ONNX_FILE
from export.freeze import DEFAULT_EXPERT_COMPUTE, FrozenNextLocMoE, freeze_nextlocmoe

log = logging.getLogger("export")
EXAMPLE_BATCH = 2  # the export example; parity runs on CHECK_BATCHES (other sizes)
CHECK_BATCHES = (1, 3, 7, 16, 37)


def eager_reference(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loc_xy_L2: np.ndarray,
    ranking: str,
    k: int,
    metres_per_unit: float,
) -> dict[str, np.ndarray]:
    """The unfrozen eager model + ranking outside the graph: scipy KD-tree (point) or the eager scores'
    top-k (scored). Same output names/semantics as ``FrozenNextLocMoE``."""
    from scipy.spatial import cKDTree

    with torch.no_grad():
        preds, _ = model(batch)
    xy = preds.xy.float().numpy()
    k = min(k, len(loc_xy_L2))
    if ranking == "scored":
        s = preds.scores.float().numpy()
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(s, ids, 1)
        if getattr(preds, "cand", None) is not None:  # retrieval head: positions -> place ids
            ids = np.take_along_axis(preds.cand.numpy(), ids, 1)
    else:
        dist, ids = cKDTree(loc_xy_L2.astype(np.float64)).query(xy.astype(np.float64), k=k)
        ids, vals = ids.reshape(len(xy), k), -dist.reshape(len(xy), k) * metres_per_unit
    return {"pred_xy": xy, "topk_ids": ids.astype(np.int64), "topk_scores": vals.astype(np.float32),
            "pred_dur": preds.dur.float().numpy()}  # fmt: skip


def check_parity(
    run_fn: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    frozen: FrozenNextLocMoE,
    loc_xy_L2: np.ndarray,
    metres_per_unit: float,
) -> dict[str, Any]:
    """Run ``run_fn({name: tensor}) -> {name: array}`` on chunks of CHECK_BATCHES sizes; compare with
    ``eager_reference``. Returns max_abs_diff (worst chunk), top10_agreement (sample mean), n_checked."""
    n = next(iter(batch.values())).shape[0]
    start, diffs, agree, sizes = 0, [], [], []
    for size in CHECK_BATCHES * (1 + n // max(sum(CHECK_BATCHES), 1)):
        if start >= n:
            break
        chunk = samples.slice_batch(batch, start, min(n, start + size))
        b = next(iter(chunk.values())).shape[0]
        ref = eager_reference(model, chunk, loc_xy_L2, frozen.ranker.mode, frozen.ranker.k, metres_per_unit)
        got = run_fn({k: chunk[k] for k in frozen.input_names})
        p = onnx_io.parity(ref, got, k=10)
        diffs.append(p["max_abs_diff"])
        agree.append(p["top10_agreement"] * b)
        sizes.append(b)
        start += b
    return {"max_abs_diff": max(diffs), "top10_agreement": sum(agree) / sum(sizes), "n_checked": sum(sizes),
            "batch_sizes": sizes}  # fmt: skip


def _tensorrt_section(out: Path, onnx_path: Path, precision: str, check: Any) -> dict[str, Any]:
    reason = trt.tensorrt_unavailable()
    if reason:
        return {"skipped": reason}
    import tensorrt

    src = onnx_path
    if precision == "fp16" and not hasattr(tensorrt.BuilderFlag, "FP16"):  # TRT >= 11: strongly typed
        src = out / "model.fp16.onnx"
        onnx_io.convert_fp16(onnx_path, src)
    build = trt.build_engine(src, out, precision)
    runner = trt.TrtRunner(build.engine_path)
    res = check(lambda feed: {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                              for k, v in runner.run(feed).items()})  # fmt: skip
    return {"path": str(build.engine_path), "precision": precision, "trt_version": build.trt_version,
            "fp32_layers": build.n_fp32_layers, "strongly_typed": build.strongly_typed, **res}  # fmt: skip


def run_export(
    run_dir: str | Path,
    out_dir: str | Path,
    formats: tuple[str, ...] = ("onnx",),
    precision: str = "fp32",
    n_check: int = 128,
    k: int = 20,
    compute: str = DEFAULT_EXPERT_COMPUTE,
    fallback: bool = False,
) -> dict[str, Any]:
    """The whole export; returns (and writes) the report. ``fallback``: ``--fallback-checkpoint``."""
    from nextlocmoe.model.io import load_run, newest_checkpoint
    from nextlocmoe.serve.engine import write_engine_files

    out = Path(out_dir)
    t0 = time.time()
    cfg, model, info = load_run(
        run_dir, fallback=fallback
    )  # before creating ``out``: a run that fails to load leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    log.info("loaded run %s (%.1fs)", run_dir, time.time() - t0)
    frozen = freeze_nextlocmoe(model, info, compute=compute, k=k)
    batch = samples.held_out_batch(cfg.data.dir, n_check + EXAMPLE_BATCH, pointer=cfg.model.pointer_window)
    example = samples.slice_batch(batch, 0, EXAMPLE_BATCH)
    held_out = samples.slice_batch(batch, EXAMPLE_BATCH, n_check + EXAMPLE_BATCH)
    onnx_path = out / ONNX_FILE
    log.info("exporting ONNX (dynamo, opset %d) ...", onnx_io.OPSET)
    res = onnx_io.export_onnx(
        frozen,
        tuple(example[n] for n in frozen.input_names),
        onnx_path,
        frozen.input_names,
        frozen.output_names,
    )
    torch.export.save(res.exported_program, str(out / FROZEN_PROGRAM))
    loc = info.loc_xy_norm.float().numpy()
    np.save(out / "locations.npy", loc)
    samples.save_inputs(out / "sample_inputs.npz", held_out, frozen.input_names)
    log.info("ONNX written (%.1fs); checking parity on %d held-out samples", time.time() - t0, n_check)
    sess = onnx_io.OrtSession(onnx_path)

    def check(fn: Any) -> dict[str, Any]:
        return check_parity(fn, model, held_out, frozen, loc, info.xy_std_m)

    report: dict[str, Any] = {
        "onnx": {"path": str(onnx_path), "opset": res.opset, "external_data": str(res.data_path or ""),
                 "precision": "fp32", "fp32_tagged_nodes": res.n_fp32_nodes, **check(sess.run)},
    }  # fmt: skip
    if "tensorrt" in formats:
        report["tensorrt"] = _tensorrt_section(out, onnx_path, precision, check)
    else:
        report["tensorrt"] = {"skipped": "not requested (--format without tensorrt)"}
    meta = {
        "input_names": list(frozen.input_names), "output_names": list(frozen.output_names),
        "routing": cfg.model.personal_moe.routing, "expert_compute": compute, "ranking": frozen.ranker.mode,
        "k": frozen.ranker.k, "precision": precision, "run": str(run_dir), "metres_per_unit": info.xy_std_m,
        "num_locations": int(loc.shape[0]), "opset": res.opset,
    }  # fmt: skip
    (out / FROZEN_META).write_text(json.dumps(meta, indent=2))
    write_engine_files(
        out, Path(cfg.data.dir), Path(run_dir), newest_checkpoint(run_dir).name, cfg, onnx_path
    )
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    log.info("export done in %.1fs -> %s", time.time() - t0, out)
    return report
