"""Model zoo (docs/models.md, "Model zoo"): names, shapes, parameter counts, padding invariance."""
from __future__ import annotations

import pytest
import torch

from sitskit.errors import UserFacingError
from sitskit.models import build, list_models
from sitskit.models.ablations import nearest_doy_index
from sitskit.models.recurrent import ConvGRUCell, ConvLSTMCell, run_recurrent
from sitskit.models.stenn import calendar_doy

torch.set_num_threads(1)

ZOO = ["stenn", "fcn_lstm", "convlstm", "convgru", "uconvlstm", "ubiconvlstm", "unet3d", "fpn_convlstm",
       "utae_single_date", "utae_skip_mean", "utae_mean_attention", "utae_batchnorm"]


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conv(c_in, c_out, k=3, dims=2):
    """Parameters of a biased convolution with a k^dims kernel."""
    return c_in * c_out * k**dims + c_out


def norm(c):
    return 2 * c


UTAE_COUNT = 1_087_260  # test_models_utae.py
UTAE_LTAE = 83_200      # L-TAE share of U-TAE (docs/models.md)
UNET_PART = UTAE_COUNT - UTAE_LTAE

# Reference counts (10 channels, 20 classes) from the U-TAE paper's code configurations.
REFERENCE_COUNTS = {
    "convlstm": 1_008_660,
    "convgru": 956_360,
    "uconvlstm": 1_520_540,
    "unet3d": 1_553_796,
    "fpn_convlstm": 1_151_028,
}

HAND_COUNTS = {
    # 4 dense blocks (inputs 10, 26, 58, 90) + 1 Transformer layer (d 144, FFN 256) + head 144->64->20 with BNs
    "stenn": (conv(10, 16) + 2 * conv(16, 16) + 3 * norm(16)
              + conv(26, 32) + 2 * conv(32, 32) + 3 * norm(32)
              + conv(58, 32) + 2 * conv(32, 32) + 3 * norm(32)
              + conv(90, 64) + 2 * conv(64, 64) + 3 * norm(64)
              + (3 * 144 * 144 + 3 * 144) + (144 * 144 + 144) + (144 * 256 + 256) + (256 * 144 + 144) + 2 * norm(144)
              + conv(144, 64) + norm(64) + conv(64, 20) + norm(20)),
    # U-Net 32-64-128-256 (double convs + BN), 2x2 transposed convs, 1x1 classifier; ConvLSTM 20->64; 1x1 head
    "fcn_lstm": (conv(10, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
                 + conv(128, 256) + conv(256, 256) + 2 * norm(32 + 64 + 128 + 256)
                 + conv(256, 128, 2) + conv(128, 64, 2) + conv(64, 32, 2)
                 + conv(256, 128) + conv(128, 128) + conv(128, 64) + conv(64, 64) + conv(64, 32) + conv(32, 32)
                 + 2 * norm(128 + 64 + 32) + conv(32, 20, 1)
                 + conv(20 + 64, 4 * 64) + conv(64, 20, 1)),
    "ubiconvlstm": UNET_PART + 2 * conv(128 + 30, 4 * 30) + conv(60, 128),
    "utae_single_date": UNET_PART,
    "utae_skip_mean": UTAE_COUNT,
    "utae_mean_attention": UTAE_COUNT,
    "utae_batchnorm": UTAE_COUNT,
}


def make_batch(t=5, short=3, c=10, hw=32, seed=0):
    """Two series: sample 0 with t dates, sample 1 with `short` valid dates then garbage padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, c, hw, hw, generator=g)
    dates = torch.sort(torch.randint(0, 400, (2, t), generator=g), dim=1).values
    pad_mask = torch.zeros(2, t, dtype=torch.bool)
    pad_mask[1, short:] = True
    dates[1, short:] = 0
    return x, dates, pad_mask


def test_every_zoo_model_is_registered():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_reference_parameter_counts(name):
    assert n_params(build(name, in_channels=10, num_classes=20)) == REFERENCE_COUNTS[name]


def test_ubiconvlstm_counts():
    """Bidirectional by default; the reference's 1,209,508 is its forward-only hidden-30 configuration."""
    assert n_params(build("ubiconvlstm", in_channels=10, num_classes=20)) == 1_414_828 == HAND_COUNTS["ubiconvlstm"]
    assert n_params(build("ubiconvlstm", in_channels=10, num_classes=20, bidirectional=False)) == 1_209_508


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_hand_computed_parameter_counts(name):
    assert n_params(build(name, in_channels=10, num_classes=20)) == HAND_COUNTS[name]


def test_reference_counts_by_hand():
    """The reference numbers themselves follow from the layer widths (catches a typo in the table)."""
    assert REFERENCE_COUNTS["convlstm"] == conv(170, 640) + conv(160, 20)
    assert REFERENCE_COUNTS["convgru"] == conv(190, 360) + conv(190, 180) + conv(180, 20)
    assert REFERENCE_COUNTS["uconvlstm"] == UNET_PART + conv(192, 256) + conv(64, 128)
    assert REFERENCE_COUNTS["fpn_convlstm"] == (conv(10, 32) + norm(32) + conv(32, 64) + norm(64) + 4 * conv(64, 64)
                                                + conv(256, 128) + norm(128) + conv(216, 352) + conv(88, 20, 1))


@pytest.mark.parametrize("name", ZOO)
def test_output_shape_at_128_without_forward(name):
    """Build at the PASTIS patch size (no forward at 128: shape via the meta device)."""
    model = build(name, in_channels=10, num_classes=20).eval()
    model = model.to("meta")
    x = torch.empty(1, 2, 10, 128, 128, device="meta")
    dates = torch.zeros(1, 2, dtype=torch.long, device="meta")
    try:
        out = model(x, dates)
    except NotImplementedError as exc:  # an op without a meta kernel
        pytest.skip(f"meta device: {exc}")
    assert out.shape == (1, 20, 128, 128)


@pytest.mark.parametrize("name", ZOO)
def test_padding_changes_nothing(name):
    """A padded shorter series gives the logits of that series alone (eval mode), shape [B,K,32,32]."""
    torch.manual_seed(0)
    model = build(name, in_channels=10, num_classes=7).eval()
    x, dates, pad_mask = make_batch()
    with torch.no_grad():
        batched = model(x, dates, pad_mask)
        alone = model(x[1:, :3], dates[1:, :3])
        full = model(x[:1], dates[:1])
    assert batched.shape == (2, 7, 32, 32)
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[:1], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["unet3d", "fcn_lstm", "uconvlstm", "fpn_convlstm", "utae_single_date"])
def test_padding_changes_nothing_in_train_mode(name):
    """BatchNorm batch statistics ignore padded dates: one series alone vs padded to 8 dates (3 -> 8 also
    changes unet3d's internal length from 4 to 8 steps)."""
    torch.manual_seed(0)
    model = build(name, in_channels=10, num_classes=5).train()
    x, dates, _ = make_batch(t=8)
    pad_mask = torch.zeros(1, 8, dtype=torch.bool)
    pad_mask[0, 3:] = True
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1], dates[:1], pad_mask), model(x[:1, :3], dates[:1, :3]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["stenn", "convgru", "unet3d", "fcn_lstm"])
def test_backward_reaches_all_parameters(name):
    model = build(name, in_channels=10, num_classes=5).train()
    x, dates, pad_mask = make_batch(t=4, short=2)
    model(x, dates, pad_mask).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_unknown_option_is_a_user_facing_error():
    with pytest.raises(UserFacingError, match="pixel_chunks"):
        build("stenn", pixel_chunks=10)


# ---------------------------------------------------------------- recurrent cells

def test_padded_steps_keep_the_state():
    torch.manual_seed(0)
    cell = ConvLSTMCell(3, 4)
    x = torch.randn(1, 4, 3, 5, 5)
    pad_mask = torch.tensor([[False, True, False, True]])
    with torch.no_grad():
        (h, c), steps = run_recurrent(cell, x, pad_mask, return_steps=True)
        h_ref, c_ref = run_recurrent(cell, x[:, [0, 2]], None)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)
    torch.testing.assert_close(steps[:, 1], steps[:, 0])  # padded date: state carried over
    torch.testing.assert_close(steps[:, 3], steps[:, 2])


def test_gru_cell_with_closed_update_gate_keeps_state():
    """z = sigmoid(-inf) = 0 -> h' = h exactly (the GRU update rule)."""
    cell = ConvGRUCell(2, 3, kernel_size=1)
    with torch.no_grad():
        cell.gates.weight.zero_()
        cell.gates.bias.fill_(-1e4)
    h = torch.randn(1, 3, 2, 2)
    (out,) = cell(torch.randn(1, 2, 2, 2), (h,))
    torch.testing.assert_close(out, h)


def test_recurrent_unet_depends_on_date_order():
    torch.manual_seed(0)
    bi = build("ubiconvlstm", in_channels=10, num_classes=4).eval()
    x, dates, _ = make_batch(t=3)
    with torch.no_grad():
        out = bi(x[:1], dates[:1])
        reversed_out = bi(x[:1].flip(1), dates[:1])
    assert not torch.allclose(out, reversed_out)  # order matters, as for any recurrent model


# ---------------------------------------------------------------- FCN + LSTM

def test_fcn_lstm_per_date_maps():
    torch.manual_seed(0)
    model = build("fcn_lstm", in_channels=10, num_classes=6).eval()
    x, dates, pad_mask = make_batch(t=5, short=3)
    with torch.no_grad():
        final, per_date = model(x, dates, pad_mask, return_per_date=True)
        early = model(x[:1, :2], dates[:1, :2])
    assert per_date.shape == (2, 5, 6, 32, 32)
    torch.testing.assert_close(per_date[0, -1], final[0])
    torch.testing.assert_close(per_date[1, 2], final[1])   # last valid date
    torch.testing.assert_close(per_date[1, 4], per_date[1, 2])  # padded dates carry the map over
    torch.testing.assert_close(per_date[0, 1], early[0], atol=1e-5, rtol=0)  # early-season output
    assert not torch.allclose(per_date[0, 0], per_date[0, 1])


# ---------------------------------------------------------------- day of year, single date

def test_calendar_doy():
    # PASTIS: day 0 = 2018-09-01 = day of year 244; day 121 = 2018-12-31 = 365; day 122 = 2019-01-01 = 1
    assert calendar_doy(torch.tensor([0, 121, 122, 150]), 244).tolist() == [244, 365, 1, 29]
    assert calendar_doy(torch.tensor([0, 31]), 1).tolist() == [1, 32]  # MTLCC: days since 1 January


def test_nearest_doy_index_is_circular_and_skips_padding():
    doy = torch.tensor([[10, 200, 220, 215], [360, 100, 5, 0]])
    pad_mask = torch.tensor([[False, False, False, True], [False, False, False, True]])
    # target 213: sample 0 -> 215 is padded, so 220 (distance 7) beats 200 (13); sample 1: 100 is nearest
    assert nearest_doy_index(doy, 213, pad_mask).tolist() == [2, 1]
    # target 2: 360 is 7 days away across new year, 5 is 3 days away
    assert nearest_doy_index(doy, 2, pad_mask).tolist() == [0, 2]


def test_single_date_uses_only_the_selected_date():
    torch.manual_seed(0)
    model = build("utae_single_date", in_channels=10, num_classes=4, doy=100, reference_doy=1).eval()
    x, _, _ = make_batch(t=4)
    dates = torch.tensor([[0, 98, 200, 300], [0, 98, 200, 300]])
    changed = x.clone()
    changed[:, [0, 2, 3]] = torch.randn_like(changed[:, [0, 2, 3]])
    with torch.no_grad():
        out = model(x, dates)
        torch.testing.assert_close(model(changed, dates), out)  # day 98 = doy 99 is the only one used
        torch.testing.assert_close(model(x[:, 1:2], dates[:, 1:2]), out)
        explicit = model(x, dates, doy=torch.tensor([[100, 1, 1, 1], [100, 1, 1, 1]]))
        torch.testing.assert_close(explicit, model(x[:, :1], dates[:, :1]))


def test_stenn_positions_follow_the_calendar_day():
    """One year later is the same calendar day: same logits (the day-offset encoding would differ)."""
    torch.manual_seed(0)
    model = build("stenn", in_channels=10, num_classes=3, pixel_chunk=100).eval()
    x, dates, _ = make_batch(t=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, dates + 365), model(x, dates), atol=1e-5, rtol=0)
        assert not torch.allclose(model(x, dates + 30), model(x, dates), atol=1e-4)


def test_stenn_chunking_and_checkpointing_do_not_change_results():
    torch.manual_seed(0)
    model = build("stenn", in_channels=10, num_classes=3, pixel_chunk=2048)
    x, dates, pad_mask = make_batch(t=6, short=2)  # 8 valid frames: two checkpointed frame groups
    model.eval()
    with torch.no_grad():
        whole = model(x, dates, pad_mask)
        model.pixel_chunk = 77
        torch.testing.assert_close(model(x, dates, pad_mask), whole, atol=1e-5, rtol=0)
    model.train()
    for module in model.modules():  # deterministic comparison
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(1)
        model(x, dates, pad_mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


def test_ablation_options_are_checked_by_build():
    assert build("utae_skip_mean", mode="reference").agg_mode == "mean"
    with pytest.raises(UserFacingError, match="agg_mode"):  # fixed by the variant: not a valid option
        build("utae_skip_mean", agg_mode="att_group")
    with pytest.raises(UserFacingError, match="encoder_norms"):
        build("utae_batchnorm", encoder_norms="group")


@pytest.mark.parametrize("name", ZOO)
def test_save_and_load_round_trip(name, tmp_path):
    from sitskit.models import from_pretrained, save_pretrained

    torch.manual_seed(0)
    model = build(name, in_channels=10, num_classes=3).eval()
    x, dates, pad_mask = make_batch(t=3, short=2)
    restored = from_pretrained(save_pretrained(model, tmp_path / name))
    with torch.no_grad():
        torch.testing.assert_close(restored(x, dates, pad_mask), model(x, dates, pad_mask))
