"""ONNX export (dynamo exporter only, opset 18, dynamic batch), external-data handling, checker, an
onnxruntime session wrapper that validates its inputs, and the parity measures of the export report.

Why dynamo only (docs/FACTS.md): the legacy TorchScript exporter silently bakes data-dependent Python
branches (a Mixtral-style loop over the experts that were hit exports without error and is wrong on other
inputs); ``torch.export`` raises on them instead. ``export_onnx`` refuses ``dynamo=False``.

Shape legend: B batch (the one dynamic axis), K ranked candidates.
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

OPSET = 18
BATCH_AXIS = "batch"
MAX_BATCH = 4096
SINGLE_FILE_MAX_BYTES = 256 * 2**20  # above this the weights go to ``<name>.onnx.data`` beside the model
FP32_SCOPES = ("router", "ranker")  # module names whose ONNX nodes are tagged "fp32/" for TensorRT
FP32_PREFIX = "fp32/"


class OnnxInputError(ValueError):
    """An input given to an ONNX session does not match the model's declared inputs."""


@dataclass
class OnnxExport:
    path: Path
    data_path: Path | None  # external-data file, None when the model is a single file
    opset: int
    exported_program: torch.export.ExportedProgram
    n_fp32_nodes: int


def _sort_stable(self: Any, stable: Any = None, dim: int = -1, descending: bool = False) -> tuple[Any, Any]:
    """aten.sort.stable -> ONNX TopK over the whole axis. The ONNX spec breaks TopK ties by the lower index
    first, which is exactly a stable sort (ascending or descending): ``routing.select``'s contract."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, k, axis=dim, largest=descending, sorted=True)
    return values, indices


TRANSLATIONS = {torch.ops.aten.sort.stable: _sort_stable}  # the exporter has no aten.sort.stable


def batch_dynamic_shapes(example_inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """Axis 0 of every input is the one shared dynamic ``batch`` dimension."""
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    return tuple({0: batch} for _ in example_inputs)


def export_program(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) with a dynamic batch axis. Raises on data-dependent control flow.
    The example batch should be >= 2 (a batch of 1 would specialise the axis)."""
    shapes: Any = batch_dynamic_shapes(example_inputs) if dynamic_batch else None
    params = inspect.signature(module.forward).parameters.values()
    if shapes is not None and any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(self, *inputs): the varargs tuple is one argument
    with torch.no_grad():
        return torch.export.export(module, example_inputs, dynamic_shapes=shapes, strict=False)


def tag_fp32_nodes(model_ir: Any, scopes: tuple[str, ...] = FP32_SCOPES) -> int:
    """Prefix with ``fp32/`` the name of every node emitted inside a module whose attribute name is one of
    ``scopes`` (from the exporter's ``pkg.torch.onnx.name_scopes`` metadata). TensorRT layer names follow
    ONNX node names, so ``trt.build_engine`` can pin exactly these layers to fp32. Returns the count."""
    n = 0
    for node in model_ir.graph.all_nodes() if hasattr(model_ir.graph, "all_nodes") else model_ir.graph:
        raw = node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]")
        try:
            names = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            names = []
        if any(str(s).rsplit(".", 1)[-1] in scopes for s in names) and not (node.name or "").startswith(
            FP32_PREFIX
        ):
            node.name = FP32_PREFIX + (node.name or node.op_type)
            n += 1
    return n


def _name_batch_axis(model_ir: Any) -> None:
    """Give the dynamic axis 0 of every graph input/output the readable name ``batch``."""
    import onnx_ir as ir

    for v in list(model_ir.graph.inputs) + list(model_ir.graph.outputs):
        if v.shape is not None and len(v.shape) and isinstance(v.shape[0], ir.SymbolicDim):
            v.shape = ir.Shape([BATCH_AXIS, *list(v.shape)[1:]])


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    *,
    opset: int = OPSET,
    dynamic_batch: bool = True,
    single_file_max_bytes: int = SINGLE_FILE_MAX_BYTES,
    dynamo: bool = True,
) -> OnnxExport:
    """Export ``module`` to ``path`` with the dynamo exporter, run ``onnx.checker`` and return the result.

    Weights are inlined when their total size is <= ``single_file_max_bytes`` (one file), otherwise
    written to ``<path>.data`` beside the model (ship both files together)."""
    if not dynamo:
        raise ValueError(
            "the legacy TorchScript ONNX exporter (dynamo=False) is refused: it silently bakes "
            "data-dependent branches into the graph (docs/FACTS.md); use the dynamo exporter"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ep = export_program(module, example_inputs, dynamic_batch)
    prog = torch.onnx.export(
        ep, (), None, input_names=list(input_names), output_names=list(output_names),
        opset_version=opset, dynamo=True, optimize=True, custom_translation_table=TRANSLATIONS,
    )  # fmt: skip
    _name_batch_axis(prog.model)
    n_fp32 = tag_fp32_nodes(prog.model)
    nbytes = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in prog.model.graph.initializers.values())
    external = nbytes > single_file_max_bytes
    data_path = path.with_name(path.name + ".data")
    if data_path.exists():
        data_path.unlink()
    prog.save(str(path), external_data=external)
    check_onnx(path)
    return OnnxExport(path, data_path if external else None, opset, ep, n_fp32)


def check_onnx(path: str | Path) -> None:
    """``onnx.checker`` by path (works with external data and models over 2 GB)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)


_ORT_TO_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
}  # fmt: skip


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class OrtSession:
    """An onnxruntime ``InferenceSession`` that checks names, ranks, static dims, dtypes and a consistent
    batch size before running, and raises ``OnnxInputError`` with one clear line otherwise."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = (
            threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)
        )
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        avail = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or avail[-1:]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.providers = self.session.get_providers()
        self.inputs = [(i.name, list(i.shape), _ORT_TO_NP.get(i.type)) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    def validate(self, feed: dict[str, np.ndarray]) -> None:
        """Raise ``OnnxInputError`` unless ``feed`` matches the declared inputs exactly."""
        missing = [n for n in self.input_names if n not in feed]
        extra = sorted(set(feed) - set(self.input_names))
        if missing or extra:
            raise OnnxInputError(
                f"ONNX inputs: missing {missing}, unexpected {extra}; expected {self.input_names}"
            )
        batch: dict[str, int] = {}
        for name, shape, dtype in self.inputs:
            x = feed[name]
            if dtype is not None and x.dtype != dtype:
                raise OnnxInputError(f"input {name!r}: dtype {x.dtype}, expected {np.dtype(dtype)}")
            if x.ndim != len(shape):
                raise OnnxInputError(f"input {name!r}: shape {x.shape} has rank {x.ndim}, expected {shape}")
            for ax, (got, want) in enumerate(zip(x.shape, shape, strict=True)):
                if isinstance(want, int) and got != want:
                    raise OnnxInputError(
                        f"input {name!r}: axis {ax} is {got}, expected {want} (shape {shape})"
                    )
                if isinstance(want, str):
                    batch.setdefault(want, got)
                    if batch[want] != got:
                        raise OnnxInputError(
                            f"input {name!r}: axis {want!r} is {got}, other inputs have {batch[want]}"
                        )

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """{input name: array or tensor} (extra keys are dropped before validation only if ``inputs`` is a
        superset built by the caller on purpose: use ``select_inputs``) -> {output name: array}."""
        feed = {k: to_numpy(v) for k, v in inputs.items()}
        self.validate(feed)
        return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))

    def select_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs out of a larger batch dict (targets etc. dropped)."""
        return {k: batch[k] for k in self.input_names if k in batch}


def parity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], k: int = 10) -> dict[str, float]:
    """max |diff| over the float outputs, and top-k agreement: the mean over samples of
    |top-k ids of ref ∩ top-k ids of got| / k (1.0 = same candidate sets; order among exact ties may
    differ between runtimes)."""
    diffs = [
        float(np.max(np.abs(ref[n].astype(np.float64) - got[n].astype(np.float64))))
        for n in ref
        if np.issubdtype(ref[n].dtype, np.floating) and ref[n].size
    ]
    ids_r, ids_g = ref["topk_ids"][:, :k], got["topk_ids"][:, :k]
    kk = max(ids_r.shape[1], 1)
    agree = [len(set(a.tolist()) & set(b.tolist())) / kk for a, b in zip(ids_r, ids_g, strict=True)]
    return {"max_abs_diff": max(diffs) if diffs else 0.0, "top10_agreement": float(np.mean(agree))}


def convert_fp16(src: str | Path, dst: str | Path) -> int:
    """fp32 ONNX -> fp16 ONNX (onnxruntime's converter) with every ``fp32/``-tagged node (routers, ranker)
    kept fp32 and the graph's inputs/outputs unchanged; for strongly typed TensorRT. Returns the number of
    nodes kept fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    block = [n.name for n in model.graph.node if n.name.startswith(FP32_PREFIX)]
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    if half.ir_version > 10:
        half.ir_version = 10  # onnx helper defaults can exceed what ORT accepts (docs/FACTS.md)
    onnx.save(half, str(dst))
    return len(block)
