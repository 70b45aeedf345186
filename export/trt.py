"""TensorRT engine builder and runner (``tensorrt`` imported lazily: nothing here is needed without it).

Build (``build_engine``): ``trt.Builder`` + ``trt.OnnxParser`` on the exported ONNX file (external data is
read from beside it), one optimisation profile min/opt/max over the dynamic batch axis, a persistent timing
cache, and reduced precision with the routers kept fp32:
- TensorRT 10.x (weakly typed): ``BuilderFlag.FP16`` / ``BF16`` + ``OBEY_PRECISION_CONSTRAINTS``, and every
  layer whose name carries the ``fp32/`` tag (``onnx_io.tag_fp32_nodes``: routers, ranker) gets
  ``layer.precision = float32`` and fp32 output types;
- TensorRT >= 11 (the FP16/BF16 flags are removed; networks are strongly typed): pass an ONNX whose
  non-router part is already fp16 (``onnx_io.convert_fp16``, router nodes blocked); bf16 needs NVIDIA
  ModelOpt AutoCast there and is refused with that reason.

Run (``TrtRunner``): deserialize, bind torch CUDA tensors by name, ``execute_async_v3`` on a stream.

Shape legend: B batch (the profile's axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FP32_PREFIX = "fp32/"  # same tag as onnx_io.FP32_PREFIX (kept import-free of onnx here)
ENGINE_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"


def tensorrt_unavailable() -> str | None:
    """None when ``import tensorrt`` works and a CUDA device is visible, else the reason (a string)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return f"import tensorrt failed: {type(e).__name__}: {e}"
    try:
        import torch

        if not torch.cuda.is_available():
            return "tensorrt is installed but no CUDA device is visible (torch.cuda.is_available() is False)"
    except Exception as e:  # pragma: no cover
        return f"torch CUDA check failed: {e}"
    return None


@dataclass
class TrtBuild:
    engine_path: Path
    precision: str
    n_fp32_layers: int
    strongly_typed: bool
    trt_version: str


def _parse(trt: Any, builder: Any, onnx_path: Path, flags: int, logger: Any) -> Any:
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    return network


def _profile(builder: Any, network: Any, batch: tuple[int, int, int]) -> Any:
    """min/opt/max over axis 0 of every input; other axes are the ONNX model's static sizes."""
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(int(d) for d in t.shape[1:])
        if any(d < 0 for d in rest):
            raise ValueError(f"input {t.name}: only axis 0 may be dynamic, got {tuple(t.shape)}")
        prof.set_shape(t.name, *((b, *rest) for b in batch))
    return prof


def _pin_fp32(trt: Any, network: Any) -> int:
    """Weakly typed networks: force the tagged layers (routers, ranker) to fp32. Returns the count."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer.name.startswith(FP32_PREFIX):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output_type(j) in (trt.float16, getattr(trt, "bfloat16", trt.float16), trt.float32):
                layer.set_output_type(j, trt.float32)
        n += 1
    return n


def _timing_cache(config: Any, path: Path) -> Any:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    precision: str = "fp16",
    batch: tuple[int, int, int] = (1, 8, 64),
    workspace_bytes: int = 4 << 30,
) -> TrtBuild:
    """ONNX -> serialized engine ``out_dir/model.plan`` (timing cache ``out_dir/timing.cache`` reused)."""
    import tensorrt as trt

    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32|fp16|bf16, got {precision!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak = hasattr(trt.BuilderFlag, "FP16")  # TensorRT <= 10: precision flags exist
    if not weak and precision == "bf16":
        raise RuntimeError(
            "TensorRT >= 11 is strongly typed: bf16 needs a bf16 ONNX (NVIDIA ModelOpt AutoCast)"
        )
    flags = 0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = _parse(trt, builder, Path(onnx_path), flags, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.add_optimization_profile(_profile(builder, network, batch))
    n_fp32 = 0
    if weak and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        n_fp32 = _pin_fp32(trt, network)
    cache_path = out_dir / TIMING_CACHE_FILE
    _timing_cache(config, cache_path)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError("TensorRT build_serialized_network failed (see the TensorRT log above)")
    engine_path = out_dir / ENGINE_FILE
    engine_path.write_bytes(bytes(blob))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return TrtBuild(engine_path, precision, n_fp32, not weak, trt.__version__)


class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors: ``run({name: tensor}) -> {name: tensor}``."""

    def __init__(self, engine_path: str | Path, device: str = "cuda") -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch, self.device = trt, torch, torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream(device=self.device)

    def _torch_dtype(self, name: str) -> Any:
        t, trt = self.torch, self.trt
        table = {trt.float32: t.float32, trt.float16: t.float16, trt.int64: t.int64, trt.int32: t.int32,
                 trt.bool: t.bool, getattr(trt, "bfloat16", trt.float16): t.bfloat16}  # fmt: skip
        return table[self.engine.get_tensor_dtype(name)]

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"TensorRT engine inputs missing: {missing}; expected {self.input_names}")
        keep = []
        for n in self.input_names:
            x = torch.as_tensor(inputs[n]).to(self.device, self._torch_dtype(n)).contiguous()
            keep.append(x)
            self.context.set_input_shape(n, tuple(x.shape))
            self.context.set_tensor_address(n, x.data_ptr())
        outs = {}
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            outs[n] = torch.empty(shape, dtype=self._torch_dtype(n), device=self.device)
            self.context.set_tensor_address(n, outs[n].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return outs
