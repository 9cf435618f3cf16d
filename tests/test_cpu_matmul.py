"""fp32 CPU products through oneDNN (sitskit.models.cpu_matmul) and the STCLN inference chunking give the
results of torch's own kernels (issue 13)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sitskit.models import build, cpu_matmul

torch.set_num_threads(1)
needs_onednn = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise")
                                  or not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def backend(monkeypatch):
    """backend(True|False): force the oneDNN path on or off for this test."""
    def force(on: bool):
        monkeypatch.setattr(cpu_matmul, "onednn_enabled", lambda: on)
    return force


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@needs_onednn
@pytest.mark.parametrize("shape", [(600, 32), (3, 300, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_values_and_gradients_equal_f_linear(backend, monkeypatch, shape, with_bias):
    backend(True)
    kernel, calls = torch.ops.mkldnn._linear_pointwise, []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or kernel(*a), raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    b = torch.randn(300, generator=g, requires_grad=True) if with_bias else None
    y = cpu_matmul.linear(x, w, b)
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    y_ref = F.linear(x, w, b)
    grads_ref = torch.autograd.grad(y_ref, [t for t in (x, w, b) if t is not None], gy)
    assert len(calls) == 2  # forward and input gradient through oneDNN (the weight gradient: torch.mm)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) < 1e-6
    for got, ref in zip(grads, grads_ref):
        assert rel_err(got, ref) < 1e-6


@needs_onednn
def test_matmul_nt_takes_transposed_views(backend):
    backend(True)
    g = torch.Generator().manual_seed(1)
    gy, x, w = torch.randn(700, 300, generator=g), torch.randn(700, 40, generator=g), torch.randn(300, 40, generator=g)
    # the two backward products of a linear: weight gradient gy^T x, input gradient gy w
    assert rel_err(cpu_matmul.matmul_nt(gy.t(), x.t()), gy.t() @ x) < 1e-6
    assert rel_err(cpu_matmul.matmul_nt(gy, w.t()), gy @ w) < 1e-6
    # no rows in the reduction (a group of sequences without a kept token): zeros, like torch
    empty = torch.empty(0, 300)
    assert torch.equal(cpu_matmul.matmul_nt(empty.t(), torch.empty(0, 40).t()), torch.zeros(300, 40))


def test_other_dtypes_and_small_inputs_use_torch(backend, monkeypatch):
    backend(True)
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a), raising=False)
    x64, w64 = torch.randn(600, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(cpu_matmul.linear(x64, w64), F.linear(x64, w64))
    x, w = torch.randn(10, 8), torch.randn(4, 8)  # fewer rows than worth a oneDNN call
    assert torch.equal(cpu_matmul.linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        big = torch.randn(600, 8)
        assert cpu_matmul.linear(big, w).dtype == torch.bfloat16
    assert calls == []


def test_backend_choice_from_the_environment(monkeypatch):
    for value, expected in (("aten", False), ("ATEN ", False)):
        cpu_matmul.onednn_enabled.cache_clear()
        monkeypatch.setenv("SITSKIT_CPU_MATMUL", value)
        assert cpu_matmul.onednn_enabled() is expected
    cpu_matmul.onednn_enabled.cache_clear()
    monkeypatch.setenv("SITSKIT_CPU_MATMUL", "fast")
    with pytest.raises(ValueError, match="SITSKIT_CPU_MATMUL must be one of"):
        cpu_matmul.onednn_enabled()
    monkeypatch.delenv("SITSKIT_CPU_MATMUL")
    cpu_matmul.onednn_enabled.cache_clear()


def small_stcln(kind: str):
    torch.manual_seed(0)
    kw = {"widths": [8, 32], "n_layers": 2, "d_ffn": 64, "n_head": 4, "pe_dim": 8, "norm_groups": 4}
    model = build(kind, in_channels=4, encoder_kwargs=kw, dropout=0.0,
                  **({"num_classes": 5, "attn_chunk_size": 256} if kind == "stcln" else {}))
    if kind == "stcln":
        with torch.no_grad():
            model.head.gate.fill_(0.5)
    return model


def series(b=2, t=7, c=4, s=16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, c, s, s, generator=g)
    dates = torch.sort(torch.randint(0, 365, (b, t), generator=g), dim=1).values
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, -2:] = True
    return x, dates, pad


@needs_onednn
@pytest.mark.parametrize("train", [False, True])
def test_stcln_classifier_same_outputs_and_gradients_with_either_backend(backend, train):
    x, dates, pad = series()
    results = []
    for on in (False, True):
        backend(on)
        model = small_stcln("stcln").train(train)
        out = model(x, dates, pad)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert (out_a - out_b).abs().max().item() <= 1e-5
    for ga, gb in zip(grads_a, grads_b):
        assert rel_err(gb, ga) < 1e-4


@needs_onednn
def test_stcln_masked_pretraining_loss_and_gradients_with_either_backend(backend):
    x, dates, pad = series()
    mask = torch.rand(x.shape[0], x.shape[1], *x.shape[3:], generator=torch.Generator().manual_seed(4)) < 0.4
    results = []
    for on in (False, True):
        backend(on)
        model = small_stcln("stcln_pretrain").train()
        pred = model(x, dates, pad, mask, masked_only=True)
        loss = (pred - model.masked_entries(x, mask)).square().mean()
        results.append((loss.item(), torch.autograd.grad(loss, list(model.parameters()))))
    assert abs(results[0][0] - results[1][0]) <= 1e-5 * abs(results[0][0])
    for ga, gb in zip(results[0][1], results[1][1]):
        assert rel_err(gb, ga) < 1e-4


@pytest.mark.parametrize("chunk_tokens", [7, 20, 10**9])
def test_inference_chunking_gives_the_unchunked_encoder_output(backend, chunk_tokens):
    backend(False)
    x, dates, pad = series()
    model = small_stcln("stcln").eval()
    with torch.inference_mode():
        model.encoder.temporal_encoder.inference_chunk_tokens = 0  # off
        ref = model.encoder(x, dates, pad)[0]
        model.encoder.temporal_encoder.inference_chunk_tokens = chunk_tokens
        got = model.encoder(x, dates, pad)[0]
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert got[1, -2:].abs().max() == 0  # padded dates stay 0


def test_importing_sitskit_turns_on_huge_pages_unless_the_user_chose():
    import os
    import subprocess
    import sys
    code = "import os, sitskit; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("1" if sys.platform.startswith("linux") else "None")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
