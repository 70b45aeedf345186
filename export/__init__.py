"""Inference export of a trained NextLocMoE run: static-shape freezing (``freeze``), ONNX export and an
onnxruntime session wrapper (``onnx_io``), a TensorRT builder/runner (``trt``, imported lazily), one runner
interface over torch / torch.compile / AOTInductor / onnxruntime / TensorRT (``backends``) and the two
entry points ``export/export.py`` and ``export/bench.py``. See docs/EXPORT.md."""
