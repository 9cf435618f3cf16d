"""STCLN encoder / pre-training model / STA classifier and the reference checkpoint import."""
from __future__ import annotations

import pytest
import torch

from sitskit.errors import UserFacingError
from sitskit.models import build, from_pretrained, save_pretrained
from sitskit.models.checkpoints import import_reference_encoder, load_pretrained_encoder
from sitskit.models.sta_head import chunked_softmax_attention, softmax_attention

torch.set_num_threads(1)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def make_input(b=1, t=4, c=10, h=6, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, h, w, generator=g)
    dates = torch.sort(torch.randint(0, 365, (b, t), generator=g), dim=1).values
    return x, dates


def pad(x, dates, extra, seed=1):
    """Append `extra` padded dates holding garbage (not zeros): invariance must not rely on zero padding."""
    g = torch.Generator().manual_seed(seed)
    b, t = dates.shape
    x_pad = torch.cat([x, 5 * torch.randn(b, extra, *x.shape[2:], generator=g)], dim=1)
    dates_pad = torch.cat([dates, torch.randint(0, 400, (b, extra), generator=g)], dim=1)
    pad_mask = torch.zeros(b, t + extra, dtype=torch.bool)
    pad_mask[:, t:] = True
    return x_pad, dates_pad, pad_mask


# ---------------------------------------------------------------- parameter counts (no forward needed)

def test_parameter_counts_match_the_paper_configuration():
    assert n_params(build("stcln_encoder", in_channels=10)) == 3_046_592
    assert n_params(build("stcln_encoder", in_channels=13)) == 3_047_456
    clf = build("stcln", in_channels=10, num_classes=20)
    assert n_params(clf.head) == 201_749
    pre = build("stcln_pretrain", in_channels=10)
    assert n_params(pre) - n_params(pre.encoder) == 2_571
    assert pre.mask_token.shape == (1,) and pre.decoder.in_features == 256 and pre.decoder.out_features == 10


def test_encoder_has_no_dead_modules_and_reference_key_names():
    keys = set(build("stcln_encoder").state_dict())
    assert len(keys) == 62  # 123 reference keys minus the 61 keys of dead modules
    assert {k.split(".")[0] for k in keys} == {"inc", "down1", "temporal_encoder"}
    assert "temporal_encoder.layer_stack.2.self_attn.in_proj_weight" in keys
    assert "inc.double_conv.4.running_var" in keys


# ---------------------------------------------------------------- shapes

def test_shapes_on_non_square_input():
    torch.manual_seed(0)
    x, dates = make_input(b=2, t=3, h=24, w=40)
    pad_mask = torch.tensor([[False, False, True], [False, False, False]])
    enc = build("stcln_encoder").eval()
    with torch.no_grad():
        feats, cnn_feats = enc(x, dates, pad_mask)
        assert feats.shape == cnn_feats.shape == (2, 3, 256, 24, 40)
        assert torch.all(feats[0, 2] == 0) and torch.all(cnn_feats[0, 2] == 0)
        clf = build("stcln", num_classes=7, attn_chunk_size=100).eval()
        assert clf(x, dates, pad_mask).shape == (2, 7, 24, 40)
        pre = build("stcln_pretrain").eval()
        mask = torch.rand(2, 3, 24, 40) < 0.4
        assert pre(x, dates, pad_mask, mask).shape == (2, 3, 10, 24, 40)


def test_bad_inputs_give_clear_errors():
    enc = build("stcln_encoder").eval()
    x, dates = make_input()
    with pytest.raises(ValueError, match="expected 10 channels"):
        enc(x[:, :, :5], dates)
    with pytest.raises(ValueError, match="dates must be"):
        enc(x, dates[:, :2])
    with pytest.raises(ValueError, match="no valid date"):
        enc(x, dates, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        build("stcln_encoder", positions="doy")


# ---------------------------------------------------------------- padding invariance

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_classifier_is_invariant_to_padding(train):
    """Same logits for a sample alone and padded with 3 garbage dates, in eval and train mode.

    Train mode: dropout is disabled (p=0; dropout masks depend on the padded shape, so identical RNG
    would not help), BatchNorm batch statistics must come from the valid frames only.
    """
    torch.manual_seed(0)
    model = build("stcln", dropout=0.0, attn_chunk_size=16)
    with torch.no_grad():
        model.head.gate.fill_(0.7)  # exercise the attention branch (it is 0 at initialisation)
    model.train(train)
    x, dates = make_input(t=4)
    x_pad, dates_pad, pad_mask = pad(x, dates, 3)
    with torch.no_grad():
        alone = model(x, dates)
        padded = model(x_pad, dates_pad, pad_mask)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_pretrain_predictions_are_invariant_to_padding(train):
    torch.manual_seed(0)
    model = build("stcln_pretrain", dropout=0.0)
    with torch.no_grad():
        model.mask_token.fill_(0.3)
    model.train(train)
    x, dates = make_input(t=4)
    mask = torch.rand(1, 4, 6, 10) < 0.4
    x_pad, dates_pad, pad_mask = pad(x, dates, 2)
    mask_pad = torch.cat([mask, torch.ones(1, 2, 6, 10, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone = model(x, dates, None, mask)
        padded = model(x_pad, dates_pad, pad_mask, mask_pad)
    torch.testing.assert_close(padded[:, :4], alone, atol=1e-5, rtol=0)


def test_batch_mixing_padded_and_full_samples_in_eval():
    torch.manual_seed(0)
    model = build("stcln", attn_chunk_size=16).eval()
    with torch.no_grad():
        model.head.gate.fill_(0.5)
    a, dates_a = make_input(t=3, seed=1)
    b, dates_b = make_input(t=5, seed=2)
    a_pad, dates_a_pad, _ = pad(a, dates_a, 2)
    pad_mask = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    with torch.no_grad():
        batch = model(torch.cat([a_pad, b]), torch.cat([dates_a_pad, dates_b]), pad_mask)
        torch.testing.assert_close(batch[0:1], model(a, dates_a), atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[1:2], model(b, dates_b), atol=1e-5, rtol=0)


def test_padding_changes_output_without_mask():
    """Sanity check of the invariance tests: unmasked garbage dates do change the result."""
    torch.manual_seed(0)
    model = build("stcln", dropout=0.0).eval()
    x, dates = make_input(t=4)
    x_pad, dates_pad, _ = pad(x, dates, 3)
    with torch.no_grad():
        assert (model(x_pad, dates_pad) - model(x, dates)).abs().max() > 1e-3


# ---------------------------------------------------------------- positions

def test_positions_dates_vs_index():
    torch.manual_seed(0)
    enc_dates = build("stcln_encoder", dropout=0.0).eval()
    enc_index = build("stcln_encoder", positions="index", dropout=0.0).eval()
    enc_index.load_state_dict(enc_dates.state_dict())
    x, dates = make_input(t=4)
    shifted = dates + 37
    with torch.no_grad():
        assert (enc_dates(x, dates)[0] - enc_dates(x, shifted)[0]).abs().max() > 1e-4
        torch.testing.assert_close(enc_index(x, dates)[0], enc_index(x, shifted)[0])
        torch.testing.assert_close(enc_index(x, dates)[0], enc_dates(x, torch.arange(4)[None])[0],
                                   atol=1e-6, rtol=0)


# ---------------------------------------------------------------- gradients, determinism

def test_every_classifier_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = build("stcln", num_classes=5, attn_chunk_size=16).train()
    with torch.no_grad():
        model.head.gate.fill_(0.5)  # at gate == 0 the query/key projections get exactly zero gradient
    x, dates = make_input(b=2, t=3)
    pad_mask = torch.tensor([[False, False, True], [False, False, False]])
    model(x, dates, pad_mask).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_every_pretrain_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = build("stcln_pretrain").train()
    x, dates = make_input(b=2, t=3)
    mask = torch.rand(2, 3, 6, 10) < 0.4
    pred = model(x, dates, None, mask)
    ((pred - x).square() * mask[:, :, None]).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mask_replaces_all_channels_by_the_token():
    model = build("stcln_pretrain")
    with torch.no_grad():
        model.mask_token.fill_(-2.5)
    x, _ = make_input()
    mask = torch.zeros(1, 4, 6, 10, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    masked = model.apply_mask(x, mask)
    assert torch.all(masked[0, 1, :, 2, 3] == -2.5)
    assert torch.equal(masked[~mask[:, :, None].expand_as(x)], x[~mask[:, :, None].expand_as(x)])


def test_cpu_determinism_with_fixed_seed():
    x, dates = make_input(t=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build("stcln", dropout=0.1, attn_chunk_size=16).train()
        outs.append(model(x, dates))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


# ---------------------------------------------------------------- STA chunked attention

def test_chunked_attention_equals_naive_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 24, generator=g, requires_grad=True)
    k = torch.randn(2, 37, 24, generator=g, requires_grad=True)
    v = torch.randn(2, 37, 8, generator=g, requires_grad=True)
    naive = softmax_attention(q, k, v, 0.3)
    chunked = chunked_softmax_attention(q, k, v, 0.3, chunk_size=5)
    torch.testing.assert_close(chunked, naive, atol=1e-6, rtol=0)
    grads_naive = torch.autograd.grad(naive.sin().sum(), (q, k, v))
    grads_chunked = torch.autograd.grad(chunked.sin().sum(), (q, k, v))
    for a, b in zip(grads_chunked, grads_naive):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sta_head_matches_the_reference_formula():
    """STA head output equals a direct transcription of the paper's head (N x N, T*D descriptors)."""
    torch.manual_seed(0)
    model = build("stcln", num_classes=4, attn_chunk_size=7).eval()
    head = model.head
    with torch.no_grad():
        head.gate.fill_(0.8)
        feats = torch.randn(1, 3, 256, 4, 5)
        cnn = torch.randn(1, 3, 256, 4, 5)
        out = head(feats, cnn)
        f = feats[0].permute(2, 3, 0, 1).reshape(20, 3, 256)  # [N, T, D]
        c = cnn[0].permute(2, 3, 0, 1).reshape(20, 3, 256)
        q = (f @ head.query.weight.T).reshape(20, 768)
        k = (c @ head.key.weight.T).reshape(20, 768)
        attn = torch.softmax(q @ k.T / 16.0, dim=1)
        v = f.max(dim=1).values @ head.value.weight.T
        o = 0.8 * attn @ v + v
        expected = (o @ head.classifier.weight.T + head.classifier.bias).T.reshape(1, 4, 4, 5)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- export / import

def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build("stcln", in_channels=10, num_classes=6, attn_chunk_size=16).eval()
    with torch.no_grad():
        model.head.gate.fill_(0.4)
    save_pretrained(model, tmp_path / "m", extra={"mlflow_run_id": "abc123"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    x, dates = make_input()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, dates), model(x, dates), atol=0, rtol=0)


def test_encoder_export_from_pretrain_model_loads_into_classifier(tmp_path):
    torch.manual_seed(0)
    pre = build("stcln_pretrain", in_channels=10)
    save_pretrained(pre.encoder, tmp_path / "encoder")
    assert from_pretrained(tmp_path / "encoder").config["name"] == "stcln_encoder"
    clf = load_pretrained_encoder(build("stcln", num_classes=3), tmp_path / "encoder")
    for key, value in pre.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[key], value), key


def _reference_state_dict(encoder):
    """A synthetic 123-key state dict laid out like the released checkpoints (incl. dead modules)."""
    state = {}
    for key, value in encoder.state_dict().items():
        state[key.replace("down1.", "down1.maxpool_conv.0.", 1)] = value.clone()
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    def bn(prefix, c):
        state.update({f"{prefix}.weight": rnd(c), f"{prefix}.bias": rnd(c), f"{prefix}.running_mean": rnd(c),
                      f"{prefix}.running_var": rnd(c).abs(), f"{prefix}.num_batches_tracked": torch.tensor(5)})

    state["up3.conv.double_conv.0.weight"] = rnd(144, 288, 3, 3)
    bn("up3.conv.double_conv.1", 144)
    state["up3.conv.double_conv.3.weight"] = rnd(32, 144, 3, 3)
    bn("up3.conv.double_conv.4", 32)
    state.update({"temporal_encoder.inconv.weight": rnd(256, 256, 1), "temporal_encoder.inconv.bias": rnd(256)})
    state.update({"temporal_encoder.mlp.0.weight": rnd(256, 256), "temporal_encoder.mlp.0.bias": rnd(256)})
    bn("temporal_encoder.mlp.1", 256)
    state.update({"temporal_encoder.out_norm.weight": rnd(256), "temporal_encoder.out_norm.bias": rnd(256)})
    for i in range(3):
        for key, value in encoder.temporal_encoder.layer_stack[i].state_dict().items():
            state[f"temporal_encoder.transformer_encoder.layers.{i}.{key}"] = rnd(*value.shape)
    state.update({"temporal_encoder.transformer_encoder.norm.weight": rnd(256),
                  "temporal_encoder.transformer_encoder.norm.bias": rnd(256)})
    return state


def test_import_reference_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = build("stcln_encoder", in_channels=13, positions="index")
    for module in source.modules():  # non-trivial BN statistics, so that a missed buffer shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    source.eval()
    state = _reference_state_dict(source)
    assert len(state) == 123
    path = tmp_path / "checkpoint_99.utae.tar"
    torch.save(state, path)
    encoder = import_reference_encoder(path).eval()
    assert encoder.in_channels == 13 and encoder.positions == "index"
    x, dates = make_input(c=13)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, dates)[0], source(x, dates)[0], atol=0, rtol=0)

    # DataParallel prefix and full training checkpoint wrappers are accepted too
    torch.save({"epoch": 99, "model_state_dict": {f"module.utae.{k}": v for k, v in state.items()}}, path)
    assert torch.equal(import_reference_encoder(path).state_dict()["down1.double_conv.0.weight"],
                       source.state_dict()["down1.double_conv.0.weight"])


def test_import_reference_checkpoint_is_strict(tmp_path):
    source = build("stcln_encoder")
    state = _reference_state_dict(source)
    path = tmp_path / "ckpt.tar"
    torch.save({**state, "temporal_encoder.extra.weight": torch.zeros(3)}, path)
    with pytest.raises(UserFacingError, match="unknown key.*temporal_encoder.extra.weight"):
        import_reference_encoder(path)
    del state["temporal_encoder.layer_stack.1.linear2.bias"]
    torch.save(state, path)
    with pytest.raises(UserFacingError, match="missing keys.*layer_stack.1.linear2.bias"):
        import_reference_encoder(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserFacingError, match="ckpt.tar"):
        import_reference_encoder(path)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    x, dates = make_input(b=2, t=3)
    mask = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(3)) < 0.4
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build("stcln_pretrain", encoder_kwargs={"grad_checkpointing": flag}).train()
        torch.manual_seed(1)  # same dropout masks in both runs (checkpointing replays the RNG state)
        pred = model(x, dates, None, mask)
        pred.square().mean().backward()
        results.append((pred.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


_STA_MEMORY_PROBE = """
import resource, sys, torch
from sitskit.models.sta_head import STAHead
torch.manual_seed(0)
head = STAHead(256, 20, chunk_size=int(sys.argv[1])).eval()
feats, cnn = torch.randn(1, 2, 256, 128, 128), torch.randn(1, 2, 256, 128, 128)
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
with torch.no_grad():
    out = head(feats, cnn)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
"""


@pytest.mark.slow
def test_sta_head_memory_on_a_full_patch_stays_far_below_the_n_by_n_matrix():
    """128x128 patch (N = 16,384): N x N float32 scores alone are 1 GiB, plus 1 GiB for their softmax.

    Measured as the peak-RSS increase of a fresh subprocess during one forward call.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _STA_MEMORY_PROBE, "1024"], capture_output=True, text=True,
                          check=True)
    increase_mib = float(proc.stdout.strip().splitlines()[-1])
    assert increase_mib < 512, increase_mib


# ---------------------------------------------------------------- encoder layer (faster forward, same maths)

def _torch_layer_and_ours(dropout):
    from sitskit.models.encoder_layer import EncoderLayer

    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout, activation="relu", batch_first=True)
    ours = EncoderLayer(32, 4, 64, dropout)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout0"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding-mask"])
def test_encoder_layer_equals_torch_transformer_encoder_layer(train, masked):
    ref, ours = _torch_layer_and_ours(0.1 if not train else 0.0)
    ref.train(train), ours.train(train)
    x = torch.randn(6, 5, 32)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2] * 3) if masked else None
    grad = torch.randn(6, 5, 32)
    if masked:
        grad = grad.masked_fill(kpm[..., None], 0.0)  # padded query rows are not compared
    results = []
    for layer, call in ((ref, lambda x: ref(x, src_key_padding_mask=kpm)), (ours, lambda x: ours(x, kpm))):
        xi = x.clone().requires_grad_()
        out = call(xi)
        (out * grad).sum().backward()
        results.append((out * (grad != 0), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)
    for name, g in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_encoder_layer_dropout_functions_match_autograd_with_the_same_masks():
    """The hand-written backward passes (attention with dropout, fused FFN) against plain autograd, same RNG."""
    import math

    from sitskit.models.encoder_layer import _AttentionFunction, _FeedForwardFunction, drop_mask

    p, t, heads, dh = 0.3, 5, 2, 8
    f64 = {"dtype": torch.float64, "requires_grad": True}
    qkv = torch.randn(4, t, 3 * heads * dh, **f64)  # in_proj's layout: q | k | v, heads inside each
    bias = torch.zeros(4, 1, 1, t, dtype=torch.float64)
    bias[::2, ..., 3:] = float("-inf")
    torch.manual_seed(5)
    out = _AttentionFunction.apply(qkv, heads, bias, p)
    assert out.shape == (4, t, heads * dh)
    g = torch.randn_like(out)
    ours = (out, *torch.autograd.grad((out * g).sum(), qkv))
    torch.manual_seed(5)
    q, k, v = qkv.view(4, t, 3, heads, dh).permute(2, 0, 3, 1, 4)  # [N, h, T, dh] each
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(dh) + bias).softmax(-1)
    dropped, scale = drop_mask(attn, p)  # the function's draw
    assert 0 < dropped.float().mean() < 1
    ref_out = ((attn.masked_fill(dropped, 0.0) * scale) @ v).transpose(1, 2).reshape(4, t, heads * dh)
    ref = (ref_out, *torch.autograd.grad((ref_out * g).sum(), qkv))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)

    ins = (torch.randn(3, t, 8, **f64), torch.randn(16, 8, **f64), torch.randn(16, **f64),
           torch.randn(8, 16, **f64), torch.randn(8, **f64))
    torch.manual_seed(7)
    out = _FeedForwardFunction.apply(*ins, p, True)
    g = torch.randn_like(out)
    ours = (out, *torch.autograd.grad((out * g).sum(), ins))
    torch.manual_seed(7)
    hidden = torch.relu(ins[0].reshape(-1, 8) @ ins[1].t() + ins[2])
    dropped, scale = drop_mask(hidden, p)  # the function's draw: True = dropped
    assert 0 < dropped.float().mean() < 1
    ref_out = (hidden.masked_fill(dropped, 0.0) * scale @ ins[3].t() + ins[4]).view(3, t, 8)
    ref = (ref_out, *torch.autograd.grad((ref_out * g).sum(), ins))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding-mask"])
def test_encoder_layer_bf16_training_step_matches_fp32_with_the_same_dropout_masks(masked):
    """Under CPU bf16 autocast, training with dropout takes the same attention function (on fp32 copies of
    q, k, v) and the same draws as fp32: one seed gives the same masks, so the two agree to bf16 rounding."""
    _, ours = _torch_layer_and_ours(0.2)
    ours.train()
    x = torch.randn(64, 7, 32)
    kpm = torch.zeros(64, 7, dtype=torch.bool)
    if masked:
        kpm[::3, 5:] = True
    g = torch.randn(64, 7, 32).masked_fill(kpm[..., None], 0.0)
    results = []
    for bf16 in (False, True):
        torch.manual_seed(11)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = ours(xi, kpm if masked else None)
        grads = torch.autograd.grad((out.float() * g).sum(), (xi, ours.self_attn.in_proj_weight))
        results.append((out.float().masked_fill(kpm[..., None], 0.0), *grads))
    (out32, gx32, gw32), (out16, gx16, gw16) = results
    torch.testing.assert_close(out16, out32, atol=0.08, rtol=0.02)  # bf16 has 8 mantissa bits
    for a, b in ((gx16, gx32), (gw16, gw32)):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("p", [0.1, 0.3, 1 / 3])
def test_drop_mask_drops_units_independently_with_probability_p_and_an_unbiased_scale(p):
    """The CPU draw (16 bits of a 64-bit draw per unit): drop rate p to 1/65536, each of the four units
    sharing a 64-bit draw at that rate and uncorrelated, scale 1/(1-p'), and the same draws for the same seed."""
    from sitskit.models.encoder_layer import drop_mask, dropout_bool_mask

    like = torch.empty(1_000_003)  # not a multiple of 4: the last 64-bit draw is cut
    torch.manual_seed(0)
    dropped, scale = drop_mask(like, p)
    k = round(p * 65536)
    assert dropped.shape == like.shape and dropped.dtype == torch.bool
    assert scale == pytest.approx(1 / (1 - k / 65536), rel=1e-12) and abs(k / 65536 - p) <= 2 ** -17
    sigma = (p * (1 - p) / like.numel()) ** 0.5
    assert abs(dropped.double().mean().item() - p) < 5 * sigma
    lanes = dropped[:1_000_000].view(-1, 4).double()
    for i in range(4):
        assert abs(lanes[:, i].mean().item() - p) < 5 * sigma * 2
    corr = torch.corrcoef(lanes.t())
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 0.01
    torch.manual_seed(0)
    assert torch.equal(drop_mask(like, p)[0], dropped)
    x = torch.ones(200_000, requires_grad=True)  # inverted dropout: unbiased, gradient = scale where kept
    y = dropout_bool_mask(x, p, True)
    assert abs(y.mean().item() - 1) < 0.02
    assert torch.equal(y.detach().unique(), torch.tensor([0.0, scale], dtype=torch.float32))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert drop_mask(like, 1.0)[0].all() and drop_mask(like, 1.0)[1] == 0.0


def test_padded_batch_with_dropout_trains_and_matches_unpadded_samples_in_eval():
    """Valid-date grouping: samples with different lengths and non-trailing padding, dropout on."""
    torch.manual_seed(0)
    model = build("stcln_pretrain")
    x, dates = make_input(b=3, t=6)
    pad_mask = torch.tensor([[False] * 6, [True, False, False, True, False, False], [False] * 4 + [True] * 2])
    model.train()
    pred = model(x, dates, pad_mask)
    pred.square().mean().backward()
    for name, p in model.named_parameters():
        assert name == "mask_token" or (p.grad is not None and torch.isfinite(p.grad).all()), name
    assert (pred[pad_mask] == model.decoder.bias[:, None, None]).all()  # padded dates: encoder output 0
    model.eval()
    with torch.no_grad():
        batch = model(x, dates, pad_mask)
        for i in range(3):
            valid = ~pad_mask[i]
            alone = model(x[i:i + 1, valid], dates[i:i + 1, valid])
            torch.testing.assert_close(batch[i:i + 1, valid], alone, atol=1e-5, rtol=0)


TINY_KW = {"widths": [8, 32], "n_layers": 2, "d_ffn": 64, "n_head": 4, "pe_dim": 8}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_masked_only_equals_the_full_output_at_the_masked_entries(padded, checkpointing):
    """The pre-training shortcut (last layer + decoder on masked pixel-dates only) changes no value or gradient
    the loss sees, with padded dates (incl. a masked one) and with gradient checkpointing."""
    from sitskit.pretrain.engine_pretrain import forward_loss

    torch.manual_seed(0)
    model = build("stcln_pretrain", encoder_kwargs={**TINY_KW, "grad_checkpointing": checkpointing}).eval()
    x, dates = make_input(b=3, t=7, h=5, w=4)
    pad_mask = None
    if padded:
        pad_mask = torch.zeros(3, 7, dtype=torch.bool)
        pad_mask[1, 5:], pad_mask[2, 6:] = True, True
        x[pad_mask] = 0
    mask = torch.rand(3, 7, 5, 4, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[1, 6] = True  # a masked padded date: 0 features -> the decoder's bias in both paths
    with torch.no_grad():
        full = model(x, dates, pad_mask, mask)
        only = model(x, dates, pad_mask, mask, masked_only=True)
    assert only.shape == (int(mask.sum()), 10)
    torch.testing.assert_close(only, model.masked_entries(full, mask), atol=1e-6, rtol=0)
    grads = []
    for masked_only in (False, True):
        model.zero_grad()
        loss, per_band = forward_loss(model, x, dates, pad_mask, mask, masked_only)
        loss.backward()
        grads.append((loss.detach(), per_band, {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-6)
    for name, g in grads[0][2].items():
        torch.testing.assert_close(grads[1][2][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_masked_only_needs_a_mask():
    model = build("stcln_pretrain", encoder_kwargs=TINY_KW)
    x, dates = make_input(t=3)
    with pytest.raises(ValueError, match="needs a mask"):
        model(x, dates, masked_only=True)
