"""U-TAE / L-TAE: paper configuration, reference state-dict compatibility, padding, modes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sitskit.models import build, from_pretrained, save_pretrained
from sitskit.models.utae import aggregate_skip

torch.set_num_threads(1)
REFERENCE_KEYS = Path("/work/shared/reference/utae_state_dicts.json")
if not REFERENCE_KEYS.is_file():  # CI checkout: the reference folder sits beside the repository
    REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "utae_state_dicts.json"


def n_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_input(b=1, t=4, c=10, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, h, w, generator=g)
    dates = torch.sort(torch.randint(0, 365, (b, t), generator=g), dim=1).values
    return x, dates


def pad_zeros(x, dates, extra):
    """Zero-pad like pad_collate (dates padded with 0)."""
    b, t = dates.shape
    x_pad = torch.cat([x, torch.zeros(b, extra, *x.shape[2:])], dim=1)
    dates_pad = torch.cat([dates, torch.zeros(b, extra, dtype=dates.dtype)], dim=1)
    pad_mask = torch.zeros(b, t + extra, dtype=torch.bool)
    pad_mask[:, t:] = True
    return x_pad, dates_pad, pad_mask


def reference_state_dict_spec():
    if not REFERENCE_KEYS.is_file():
        pytest.skip("utae_state_dicts.json not available")
    return json.loads(REFERENCE_KEYS.read_text())["utae_semantic"]


# ---------------------------------------------------------------- configuration

def test_paper_configuration_parameter_count():
    model = build("utae", in_channels=10, num_classes=20)
    assert n_trainable(model) == 1_087_260
    spec = reference_state_dict_spec()
    for module, count in spec["by_module"].items():
        assert n_trainable(getattr(model, module)) == count, module


@pytest.mark.parametrize("mode", ["clean", "reference"])
def test_reference_state_dict_loads_strictly(mode):
    """A state dict with exactly the utae-paps keys, shapes and dtypes (158 entries incl. BN buffers)."""
    spec = reference_state_dict_spec()["state_dict"]
    assert len(spec) == 158
    g = torch.Generator().manual_seed(0)
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {}
    for key, shape, dtype in spec:
        if dtypes[dtype] == torch.int64:
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    model = build("utae", mode=mode)
    own = model.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(s) for k, s, _ in spec}
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.temporal_encoder.attention_heads.Q, state["temporal_encoder.attention_heads.Q"])
    model.eval()
    x, dates = make_input(h=16, w=16)
    with torch.no_grad():
        assert torch.isfinite(model(x, dates)).all()


def test_batch_encoder_norm_and_agg_modes_build():
    model = build("utae", encoder_norm="batch")
    assert isinstance(model.in_conv.conv.conv[1], torch.nn.BatchNorm2d)
    # GroupNorm(4) and BatchNorm2d have the same number of affine parameters
    assert n_trainable(model) == 1_087_260
    with pytest.raises(ValueError, match="agg_mode"):
        build("utae", agg_mode="max")
    with pytest.raises(ValueError, match="mode"):
        build("utae", mode="fast")


# ---------------------------------------------------------------- shapes, padding

@pytest.mark.parametrize("agg_mode", ["att_group", "att_mean", "mean"])
def test_shapes_non_square_and_return_maps(agg_mode):
    torch.manual_seed(0)
    model = build("utae", num_classes=7, agg_mode=agg_mode).eval()
    x, dates = make_input(b=2, t=3, h=24, w=40)
    pad_mask = torch.tensor([[False, False, True], [False, False, False]])
    with torch.no_grad():
        assert model(x, dates, pad_mask).shape == (2, 7, 24, 40)
        out, maps = model(x, dates, pad_mask, return_maps=True)
    assert out.shape == (2, 32, 24, 40)
    assert [tuple(m.shape) for m in maps] == [(2, 128, 3, 5), (2, 64, 6, 10), (2, 32, 12, 20), (2, 32, 24, 40)]
    assert maps[-1] is out


def test_spatial_size_must_be_divisible_by_8():
    model = build("utae").eval()
    x, dates = make_input(h=20, w=24)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(x, dates)


@pytest.mark.parametrize("agg_mode", ["att_group", "att_mean", "mean"])
@pytest.mark.parametrize("encoder_norm", ["group", "batch"])
def test_clean_mode_is_invariant_to_padding_in_eval(agg_mode, encoder_norm):
    torch.manual_seed(0)
    model = build("utae", agg_mode=agg_mode, encoder_norm=encoder_norm).eval()
    x, dates = make_input(t=4)
    x_pad, dates_pad, pad_mask = pad_zeros(x, dates, 3)
    x_pad[:, 4:] = torch.randn_like(x_pad[:, 4:])  # garbage in padded frames: only pad_mask counts
    with torch.no_grad():
        torch.testing.assert_close(model(x_pad, dates_pad, pad_mask), model(x, dates), atol=1e-5, rtol=0)


def test_reference_mode_keeps_the_in_norm_padding_quirk():
    """The reference normalises over padded steps: zero-padding changes the output (documented quirk)."""
    torch.manual_seed(0)
    clean = build("utae").eval()
    reference = build("utae", mode="reference").eval()
    reference.load_state_dict(clean.state_dict())
    x, dates = make_input(t=4)
    x_pad, dates_pad, pad_mask = pad_zeros(x, dates, 3)
    with torch.no_grad():
        ltae_ref = reference(x_pad, dates_pad, pad_mask, return_maps=True)[1][0]
        ltae_ref_alone = reference(x, dates, return_maps=True)[1][0]
        assert (ltae_ref - ltae_ref_alone).abs().max() > 1e-4
        # without padding both modes agree up to the final ReLU
        torch.testing.assert_close(reference(x, dates), clean(x, dates).clamp_min(0), atol=1e-5, rtol=0)


def test_reference_mode_logits_are_non_negative_and_clean_are_not():
    torch.manual_seed(0)
    x, dates = make_input(b=2, t=3)
    with torch.no_grad():
        assert build("utae", mode="reference").train()(x, dates).min() >= 0
        assert build("utae").train()(x, dates).min() < 0


def test_reference_weight_init():
    torch.manual_seed(0)
    model = build("utae", mode="reference")
    # Conv1d (L-TAE inconv) and BN weights drawn from N(0, 1): std ~ 1 and about half negative
    assert 0.8 < model.temporal_encoder.inconv.weight.std() < 1.2
    bn_weight = model.up_blocks[0].conv1.conv[1].weight
    assert (bn_weight < 0).any() and bn_weight.std() > 0.5
    assert torch.equal(model.in_conv.conv.conv[1].weight, torch.ones(64))  # GroupNorm untouched
    clean_bn = build("utae").up_blocks[0].conv1.conv[1].weight
    assert torch.equal(clean_bn, torch.ones_like(clean_bn))  # clean mode: PyTorch defaults


# ---------------------------------------------------------------- L-TAE

def test_ltae_attention_and_padding():
    torch.manual_seed(0)
    ltae = build("ltae", in_channels=32, n_head=4, d_k=4, d_model=64, mlp=(64, 32)).eval()
    x = torch.randn(2, 5, 32, 3, 4)
    dates = torch.arange(5).expand(2, 5) * 10
    pad_mask = torch.zeros(2, 5, dtype=torch.bool)
    pad_mask[0, 3:] = True
    with torch.no_grad():
        out, attn = ltae(x, dates, pad_mask, return_attention=True)
        alone = ltae(x[:1, :3], dates[:1, :3])
    assert out.shape == (2, 32, 3, 4) and attn.shape == (4, 2, 5, 3, 4)
    torch.testing.assert_close(attn.sum(dim=2), torch.ones(4, 2, 3, 4))
    assert torch.all(attn[:, 0, 3:] == 0)
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=0)


def test_aggregate_skip_att_group_uses_head_g_for_channel_group_g():
    x = torch.randn(1, 3, 8, 4, 4)
    attn = torch.zeros(2, 1, 3, 2, 2)
    attn[0, :, 0] = 1.0  # head 0 picks date 0, head 1 picks date 2
    attn[1, :, 2] = 1.0
    out = aggregate_skip(x, attn, None, "att_group")
    torch.testing.assert_close(out[:, :4], x[:, 0, :4])
    torch.testing.assert_close(out[:, 4:], x[:, 2, 4:])
    pad_mask = torch.tensor([[False, False, True]])
    torch.testing.assert_close(aggregate_skip(x, attn, pad_mask, "mean"), x[:, :2].mean(dim=1))


# ---------------------------------------------------------------- training behaviour

def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = build("utae", num_classes=5).train()
    x, dates = make_input(b=2, t=3)
    pad_mask = torch.tensor([[False, False, True], [False, False, False]])
    model(x, dates, pad_mask).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cpu_determinism_and_round_trip(tmp_path):
    x, dates = make_input(t=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = build("utae", num_classes=4).train()
        outs.append(model(x, dates))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    model.eval()
    save_pretrained(model, tmp_path / "utae")
    loaded = from_pretrained(tmp_path / "utae")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, dates), model(x, dates), atol=0, rtol=0)
