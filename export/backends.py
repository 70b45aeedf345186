"""One runner interface over the inference backends of an engine folder (written by export/export.py).

Every runner has ``name``, ``device``, ``unavailable() -> reason | None``, ``prepare(engine_dir)`` and
``run(inputs: {name: tensor}) -> {output name: numpy array}`` (synchronous: results are on the host).
A backend that cannot run here reports why (``unavailable`` or a failed ``prepare``); it never vanishes.

- ``torch``: the frozen module's exported program (``frozen.pt2``) run eagerly, op by op;
- ``compile``: ``torch.compile`` of the same module (Inductor; first call per shape compiles);
- ``aoti``: AOTInductor package (``torch._inductor.aoti_compile_and_package``), compiled once into
  ``aoti_<device>.pt2`` in the engine folder and loaded with ``aoti_load_package``;
- ``onnxruntime``: ``model.onnx`` through ``onnx_io.OrtSession`` (CUDA EP when present and asked for);
- ``tensorrt``: ``model.plan`` through ``trt.TrtRunner`` (needs ``tensorrt`` and a CUDA device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.onnx_io import OrtSession
from export.trt import ENGINE_FILE, TrtRunner, tensorrt_unavailable

FROZEN_PROGRAM = "frozen.pt2"
FROZEN_META = "frozen.json"
ONNX_FILE = "model.onnx"
BACKENDS = ("torch", "compile", "aoti", "onnxruntime", "tensorrt")


def read_meta(engine_dir: str | Path) -> dict[str, Any]:
    path = Path(engine_dir) / FROZEN_META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {engine_dir} an export/export.py output folder?)")
    return json.loads(path.read_text())


def _host(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class Runner:
    """Base runner: positional execution of a callable in ``input_names`` order."""

    name = "base"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self._fn: Any = None

    def unavailable(self) -> str | None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA device visible"
        return None

    def prepare(self, engine_dir: str | Path) -> None:
        meta = read_meta(engine_dir)
        self.input_names, self.output_names = list(meta["input_names"]), list(meta["output_names"])

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        args = [torch.as_tensor(inputs[n]).to(self.device) for n in self.input_names]
        with torch.inference_mode():
            outs = self._fn(*args)
        return dict(zip(self.output_names, (_host(o) for o in outs), strict=True))


class TorchRunner(Runner):
    name = "torch"

    def _module(self, engine_dir: str | Path) -> torch.nn.Module:
        ep = torch.export.load(str(Path(engine_dir) / FROZEN_PROGRAM))
        return ep.module().to(self.device)

    def prepare(self, engine_dir: str | Path) -> None:
        super().prepare(engine_dir)
        self._fn = self._module(engine_dir)


class CompileRunner(TorchRunner):
    name = "compile"

    def prepare(self, engine_dir: str | Path) -> None:
        Runner.prepare(self, engine_dir)
        self._fn = torch.compile(self._module(engine_dir), dynamic=True)


class AotiRunner(Runner):
    name = "aoti"

    def prepare(self, engine_dir: str | Path) -> None:
        super().prepare(engine_dir)
        pkg = Path(engine_dir) / f"aoti_{self.device.split(':')[0]}.pt2"
        if not pkg.is_file():
            ep = torch.export.load(str(Path(engine_dir) / FROZEN_PROGRAM))
            if self.device != "cpu":
                ep = ep.run_decompositions()
            torch._inductor.aoti_compile_and_package(ep, package_path=str(pkg))
        self._fn = torch._inductor.aoti_load_package(str(pkg))


class OrtRunner(Runner):
    name = "onnxruntime"

    def unavailable(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"import onnxruntime failed: {e}"
        if self.device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
        return None

    def prepare(self, engine_dir: str | Path) -> None:
        super().prepare(engine_dir)
        cuda = self.device.startswith("cuda")
        self._sess = OrtSession(
            Path(engine_dir) / ONNX_FILE, ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        )

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return self._sess.run({n: inputs[n] for n in self.input_names})


class TensorRTRunner(Runner):
    name = "tensorrt"

    def unavailable(self) -> str | None:
        return tensorrt_unavailable()

    def prepare(self, engine_dir: str | Path) -> None:
        super().prepare(engine_dir)
        plan = Path(engine_dir) / ENGINE_FILE
        if not plan.is_file():
            raise FileNotFoundError(f"{plan}: no TensorRT engine (export with --format onnx,tensorrt)")
        self._trt = TrtRunner(plan, self.device)

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: _host(v) for k, v in self._trt.run({n: inputs[n] for n in self.input_names}).items()}


_RUNNERS: dict[str, type[Runner]] = {
    "torch": TorchRunner, "compile": CompileRunner, "aoti": AotiRunner,
    "onnxruntime": OrtRunner, "tensorrt": TensorRTRunner,
}  # fmt: skip


def default_device(name: str) -> str:
    """cuda for TensorRT (only); cuda for the others when a GPU is visible, else cpu."""
    return "cuda" if (name == "tensorrt" or torch.cuda.is_available()) else "cpu"


def make_runner(name: str, device: str | None = None) -> Runner:
    if name not in _RUNNERS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return _RUNNERS[name](device or default_device(name))
