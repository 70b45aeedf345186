"""ONNX export: dynamo only, dynamic batch, parity at other batch sizes, stable-sort ties, the Mixtral-style
data-dependent loop refused, clear input errors, TensorRT skip reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.freeze import freeze_moe_layers
from export.onnx_io import OnnxInputError, OrtSession, export_onnx
from export.trt import tensorrt_unavailable
from tests.unit.test_export_freeze import make_moe, tiny_llama


class LayerStack(nn.Module):
    """Tiny Llama (inputs_embeds + mask) whose FFN 1 is a frozen PersonalMoE; ctx is a graph input."""

    def __init__(self, routing: str, bias: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.llama = tiny_llama()
        moe = make_moe(self.llama.layers[1].mlp, routing)
        if bias is not None:  # a balancing bias (model/balance.py): frozen into the graph as a constant
            moe.router.sel_bias_E.copy_(torch.tensor(bias))
        freeze_moe_layers(moe, "masked")
        self.llama.layers[1].mlp = moe

    def forward(
        self, x_BSD: torch.Tensor, mask_BS: torch.Tensor, ctx_BC: torch.Tensor
    ) -> tuple[torch.Tensor]:
        with self.llama.layers[1].mlp.context.scope(ctx_BC) as records:
            h = self.llama(inputs_embeds=x_BSD, attention_mask=mask_BS).last_hidden_state
        return h[:, -1], records[0].ids_TK


def _inputs(B: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 9, dtype=torch.long)
    mask[0, :2] = 0
    return torch.randn(B, 9, 32, generator=g), mask, torch.randn(B, 8, generator=g)


@pytest.mark.parametrize("routing", ["topk", "threshold"])
@pytest.mark.parametrize("bias", [None, (1.0, -1.5, 0.4, 0.0, -0.6)])
def test_llama_moe_onnx_parity_other_batches(tmp_path: Path, routing: str, bias) -> None:
    m = LayerStack(routing, bias).eval()
    res = export_onnx(m, _inputs(2, 0), tmp_path / "m.onnx", ("x", "mask", "ctx"), ("h_last", "ids"))
    assert res.data_path is None and res.opset == 18 and res.n_fp32_nodes > 0
    sess = OrtSession(res.path)
    assert sess.inputs[0][1][0] == "batch"
    for B in (1, 5, 33):
        xs = _inputs(B, B)
        with torch.no_grad():
            ref = [t.numpy() for t in m(*xs)]
        got = sess.run(dict(zip(("x", "mask", "ctx"), xs, strict=True)))
        assert np.abs(got["h_last"] - ref[0]).max() <= 1e-4
        if bias is None:
            np.testing.assert_array_equal(got["ids"], ref[1])
        else:
            _assert_equal_on_real_tokens(got["ids"], ref[1], xs[1])


def _assert_equal_on_real_tokens(got: np.ndarray, want: np.ndarray, mask_BS: torch.Tensor) -> None:
    """Routing of every real (unmasked) token is identical. Padded positions are attention rows with no
    key, whose hidden states ORT and torch compute differently (they never reach an output); with a
    balancing bias their routing may differ, so they are excluded here, and only here."""
    real = mask_BS.reshape(-1).bool().numpy()
    assert (~real).sum() == 2  # _inputs pads the first 2 positions of sample 0 only
    np.testing.assert_array_equal(got[real], want[real])


def test_stable_sort_ties_match_routing_contract(tmp_path: Path) -> None:
    from nextlocmoe.model.routing import select

    class Sel(nn.Module):
        def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return select(p, "threshold", 2, 0.7, 4)

    res = export_onnx(Sel(), (torch.rand(3, 6),), tmp_path / "s.onnx", ("p",), ("ids", "w"))
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0], [0.1, 0.3, 0.1, 0.3, 0.1, 0.1]] * 2)
    got = OrtSession(res.path).run({"p": p})
    ref = select(p, "threshold", 2, 0.7, 4)
    np.testing.assert_array_equal(got["ids"], ref[0].numpy())


class MixtralLoop(nn.Module):
    """The HF Mixtral pattern: loop over the experts that were hit (data-dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.gate = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(torch.softmax(self.gate(x), -1), 2)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            t, k = torch.nonzero(idx == e, as_tuple=True)
            out = out.index_add(0, t, self.experts[e](x[t]) * w[t, k, None])
        return out


def test_data_dependent_expert_loop_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:
        export_onnx(MixtralLoop(), (torch.randn(6, 8),), tmp_path / "x.onnx", ("x",), ("y",))
    assert "data" in str(err.value).lower() or "guard" in str(err.value).lower()
    assert not (tmp_path / "x.onnx").exists()


def test_legacy_exporter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="legacy"):
        export_onnx(nn.Linear(2, 2), (torch.randn(2, 2),), tmp_path / "l.onnx", ("x",), ("y",), dynamo=False)


def test_external_data_when_large(tmp_path: Path) -> None:
    res = export_onnx(nn.Linear(256, 256), (torch.randn(2, 256),), tmp_path / "big.onnx", ("x",), ("y",),
                      single_file_max_bytes=1024)  # fmt: skip
    assert res.data_path is not None and res.data_path.is_file()
    out = OrtSession(res.path).run({"x": np.ones((3, 256), np.float32)})
    assert out["y"].shape == (3, 256)


def test_session_validates_inputs(tmp_path: Path) -> None:
    res = export_onnx(LayerStack("topk").eval(), _inputs(2, 0), tmp_path / "m.onnx", ("x", "mask", "ctx"),
                      ("h_last", "ids"))  # fmt: skip
    sess = OrtSession(res.path)
    x, mask, ctx = (t.numpy() for t in _inputs(3, 0))
    cases = [
        ({"x": x, "mask": mask}, "missing"),
        ({"x": x, "mask": mask.astype(np.int32), "ctx": ctx}, "dtype"),
        ({"x": x[:, :4], "mask": mask, "ctx": ctx}, "axis 1"),
        ({"x": x, "mask": mask, "ctx": ctx[:2]}, "batch"),
        ({"x": x[0], "mask": mask, "ctx": ctx}, "rank"),
    ]
    for feed, word in cases:
        with pytest.raises(OnnxInputError, match=word):
            sess.run(feed)


def test_tensorrt_reports_reason_when_missing() -> None:
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("tensorrt is available here")
    assert "tensorrt" in reason.lower() or "cuda" in reason.lower()
