"""The simulated data behave like the real datasets where the papers' claims depend on it.

Class imbalance, series length and gaps, cloud share, field sizes, phenology, a temporal signal that a
per-pixel classifier can exploit (all dates >> best single date), confusable wheats, year domain shift.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from sitskit.constants import PASTIS_BANDS
from sitskit.simulate import pastis_parcel_classes, simulate_mtlcc_tile, simulate_pastis_patch
from sitskit.simulate.mtlcc import MEAN_FIELD_PX as MTLCC_FIELD_PX
from sitskit.simulate.parcels import FIELD, Layout, make_layout
from sitskit.simulate.pastis import CLASS_IDS, CLASS_WEIGHTS, season_day
from sitskit.simulate.phenology import PASTIS_PROGRAMS
from sitskit.simulate.scene import assign_classes

B4, B8 = PASTIS_BANDS.index("B4"), PASTIS_BANDS.index("B8")
GRID = np.arange(-110, 311, 10)  # season days of a common 10-day grid (Sept 2018 .. early Nov 2019)


def _ids(n: int, offset: int = 0) -> list[int]:
    return [10000 * (k % 4 + 1) + k // 4 + offset for k in range(n)]


def test_class_imbalance_like_pastis():
    """Over ~6 000 parcels of 120 patches: PASTIS frequencies, all classes, realistic void share."""
    classes = np.concatenate([pastis_parcel_classes(pid, seed=11) for pid in _ids(120)])
    counts = np.bincount(classes, minlength=20)
    crops = counts[1:19]
    assert crops.min() > 0, "every crop class occurs"
    assert crops.argmax() == 0, "meadow is the most common class"
    assert crops.max() / crops.min() > 25  # the expected 57 (below) blurred by sampling noise
    expected = CLASS_WEIGHTS / CLASS_WEIGHTS.sum() * crops.sum()
    assert np.corrcoef(crops, expected)[0, 1] > 0.99, "the tessellation does not distort frequencies"
    void_share = counts[19] / counts.sum()
    assert 0.15 < void_share < 0.4  # real PASTIS: 35 924 of 124 422 parcels
    assert 35 < len(classes) / 120 < 70  # ~50 parcels per 128 x 128 patch


def test_class_assignment_ratio_above_50():
    """The per-parcel class draw itself, over 60 000 parcels: most/least common > 50 (PASTIS: 57)."""
    n = 60000
    layout = Layout(region=np.zeros((1, 1), np.int64), cover=np.full(n, FIELD), inside_frac=np.ones(n),
                    area=np.ones(n, np.int64))
    cls = assign_classes(np.random.default_rng(0), layout, CLASS_IDS, CLASS_WEIGHTS, PASTIS_PROGRAMS).cls
    counts = np.bincount(cls, minlength=19)[1:19]
    assert counts.max() / counts.min() > 50


def test_field_sizes_and_background():
    rng = np.random.default_rng(0)
    pastis = [make_layout(rng, 128, 330) for _ in range(4)]
    areas = np.concatenate([lay.area[lay.field_regions][lay.inside_frac[lay.field_regions] > 0.99]
                            for lay in pastis])
    assert 200 <= np.median(areas) <= 500  # 2-5 ha at 10 m
    mtlcc = [make_layout(rng, 48, MTLCC_FIELD_PX) for _ in range(8)]
    areas = np.concatenate([lay.area[lay.field_regions][lay.inside_frac[lay.field_regions] > 0.99]
                            for lay in mtlcc])
    assert 50 <= np.median(areas) <= 200  # 0.5-2 ha
    for lay in pastis:
        border = lay.region == 0
        assert 0.03 < border.mean() < 0.2, "narrow roads/hedges between fields"
        assert (lay.cover[lay.region] == FIELD).mean() > 0.6


@pytest.fixture(scope="module")
def small_patches():
    return [simulate_pastis_patch(pid, size=16, seed=2) for pid in _ids(48)]


def test_series_length_gaps_and_clouds(small_patches):
    lengths, gaps, cloudy = [], [], []
    for p in small_patches:
        days = np.array([d.toordinal() for d in p.dates])
        assert np.all(np.diff(days) > 0), "chronological, no duplicate dates"
        assert p.dates[0] >= dt.date(2018, 9, 1) and p.dates[-1] <= dt.date(2019, 11, 30)
        lengths.append(len(days))
        gaps.append(np.diff(days))
        cloudy.append(p.cloud_mask.any(axis=(1, 2)))
    assert 38 <= min(lengths) and max(lengths) <= 61 and np.ptp(lengths) >= 10
    assert 3 <= np.median(np.concatenate(gaps)) <= 7
    share = np.concatenate(cloudy).mean()
    assert 0.20 <= share <= 0.36
    # partly cloudy: clouds never cover a whole image
    assert max(m.mean(axis=(1, 2)).max() for m in (p.cloud_mask for p in small_patches)) < 1


def _interp_matrix(days: np.ndarray) -> np.ndarray:
    """[G, T] linear interpolation weights from the acquisition days onto GRID."""
    w = np.zeros((len(GRID), len(days)))
    for g, x in enumerate(GRID):
        j = int(np.searchsorted(days, x))
        if j == 0 or j >= len(days):
            w[g, min(j, len(days) - 1)] = 1
        else:
            a = (x - days[j - 1]) / (days[j] - days[j - 1])
            w[g, j - 1], w[g, j] = 1 - a, a
    return w


def _pixels(ids, size, seed, weights, step=1):
    """Per-pixel features [N, G, 10] on the common grid and labels [N] of the crop pixels."""
    xs, ys = [], []
    for pid in ids:
        p = simulate_pastis_patch(pid, size=size, seed=seed, class_weights=weights)
        days = np.array([season_day(d, 2019) for d in p.dates], dtype=float)
        x = _interp_matrix(days) @ p.s2.reshape(len(days), -1).astype(np.float64)
        x = x.reshape(len(GRID), 10, -1).transpose(2, 0, 1)
        sem = p.semantic.ravel()
        keep = (sem > 0) & (sem < 19)
        xs.append(x[keep][::step])
        ys.append(sem[keep][::step])
    return np.concatenate(xs), np.concatenate(ys)


def _lda_accuracy(xtr, ytr, xte, yte, ridge=0.1) -> float:
    """Nearest class centroid after normalising and whitening with the pooled within-class covariance."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    cls = np.unique(ytr)
    centroids = np.stack([xtr[ytr == c].mean(0) for c in cls])
    resid = xtr - centroids[np.searchsorted(cls, ytr)]
    cov = resid.T @ resid / len(resid) + ridge * np.eye(xtr.shape[1])
    white = np.linalg.cholesky(np.linalg.inv(cov))
    a, c = xte @ white, centroids @ white
    dist = (a ** 2).sum(1)[:, None] - 2 * a @ c.T + (c ** 2).sum(1)[None]
    return float((cls[dist.argmin(1)] == yte).mean())


def _full_vs_best_single(weights, n_train, n_test, seed, train_step):
    """Accuracy on held-out patches of the classifier on the whole series and of the best single date
    (the best date is picked on the test set, which only flatters the single-date classifier)."""
    xtr, ytr = _pixels(_ids(n_train), 96, seed, weights, step=train_step)
    xte, yte = _pixels(_ids(n_test, offset=500), 96, seed, weights, step=2)
    full = _lda_accuracy(xtr.reshape(len(xtr), -1), ytr, xte.reshape(len(xte), -1), yte)
    single = max(_lda_accuracy(xtr[:, g], ytr, xte[:, g], yte) for g in range(len(GRID)))
    return full, single


def test_all_dates_beat_the_best_single_date():
    """Balanced 18 crop classes, train/test on different patches: the series carries the class."""
    full, single = _full_vs_best_single({c: 1.0 for c in range(1, 19)}, 6, 6, seed=2, train_step=2)
    assert full >= single + 0.15, (full, single)
    assert full > 0.4


@pytest.mark.parametrize("weights, margin", [
    ({2: 1.0, 10: 1.0, 11: 1.0}, 0.05),  # soft wheat / triticale / durum wheat
    ({3: 1.0, 18: 1.0}, 0.03),           # corn / sorghum
], ids=["wheats", "corn-sorghum"])
def test_confusable_classes_separate_over_the_season(weights, margin):
    """Look-alike crops: more confused on any single date than with the full series."""
    full, single = _full_vs_best_single(weights, 16, 6, seed=3, train_step=4)
    assert full >= single + margin, (full, single)


def test_phenology_of_key_classes():
    """Corn is bare in March and green in August; winter wheat is the other way round."""
    p = simulate_pastis_patch(10007, size=64, seed=4, class_weights={2: 1.0, 3: 1.0})
    days = np.array([season_day(d, 2019) for d in p.dates])
    clear = ~p.cloud_mask.any(axis=(1, 2))
    ndvi = (p.s2[:, B8].astype(float) - p.s2[:, B4]) / (p.s2[:, B8].astype(float) + p.s2[:, B4])

    def median_ndvi(cls, lo, hi):
        t = clear & (days >= lo) & (days <= hi)
        return float(np.median(ndvi[t][:, p.semantic == cls]))

    assert median_ndvi(3, 60, 100) < 0.35 and median_ndvi(3, 200, 240) > 0.75   # corn
    assert median_ndvi(2, 110, 140) > 0.75 and median_ndvi(2, 200, 240) < 0.35  # wheat, harvested in July


def test_rapeseed_flowering_and_meadow_mowing():
    """Rapeseed turns yellow in mid-April (B3 up, NDVI down); meadows show sudden mowing drops."""
    p = simulate_pastis_patch(10011, size=48, seed=4, class_weights={5: 1.0, 1: 1.0})
    days = np.array([season_day(d, 2019) for d in p.dates])
    clear = ~p.cloud_mask.any(axis=(1, 2))
    s2 = p.s2.astype(float)
    ndvi = (s2[:, B8] - s2[:, B4]) / (s2[:, B8] + s2[:, B4])
    rape = p.semantic == 5
    b3 = np.median(s2[:, PASTIS_BANDS.index("B3")][:, rape], axis=1)
    flowering = clear & (days >= 100) & (days <= 115)
    around = clear & (((days >= 70) & (days <= 90)) | ((days >= 125) & (days <= 140)))
    assert flowering.any() and around.any()
    assert b3[flowering].mean() > 1.2 * b3[around].mean()
    assert np.median(ndvi[flowering][:, rape]) < np.median(ndvi[around][:, rape])
    # mowing: some clear summer date where a meadow parcel loses > 0.15 NDVI against the previous clear date
    meadow_ids = np.unique(p.region[p.semantic == 1])
    t = np.flatnonzero(clear & (days >= 120) & (days <= 270))
    drops = [np.diff(np.array([ndvi[k][p.region == r].mean() for k in t])).min() for r in meadow_ids]
    assert min(drops) < -0.15


def _greenup_doy(tile, cls):
    """Day of year when the median clear-sky NDVI of class `cls` first exceeds 0.5."""
    n = tile.n_obs
    x = tile.x10[:n].astype(float)
    ndvi = (x[..., 3] - x[..., 0]) / (x[..., 3] + x[..., 0])
    clear = ~tile.cloud_mask.any(axis=(1, 2))
    curve = np.array([np.median(ndvi[t][tile.crop_class == cls]) for t in range(n)])
    doy = tile.doy[:n][clear & (curve > 0.5)]
    return int(doy.min())


def test_years_are_a_domain_shift():
    """data16 vs data17 of the same tiles: same fields, rotated crops, earlier spring in 2017."""
    t16 = [simulate_mtlcc_tile(i, 2016, size=48, seed=8) for i in range(6)]
    t17 = [simulate_mtlcc_tile(i, 2017, size=48, seed=8) for i in range(6)]
    changed = np.mean([(a.labels != b.labels)[(a.labels > 0) & (b.labels > 0)].mean() for a, b in zip(t16, t17)])
    assert 0.2 < changed < 0.95, "crop rotation changes many, not all, fields"
    assert np.mean([t.n_obs for t in t16]) != np.mean([t.n_obs for t in t17])
    # winter wheat (22) greens up earlier in 2017 than in 2016 in every tile that has it
    shifts = [_greenup_doy(a, 22) - _greenup_doy(b, 22) for a, b in zip(t16, t17)
              if (a.crop_class == 22).sum() > 50 and (b.crop_class == 22).sum() > 50]
    assert shifts and np.median(shifts) >= 5, shifts


def test_pastis_year_moves_the_calendar():
    p = simulate_pastis_patch(30002, size=16, seed=1, year=2021)
    assert p.dates[0] >= dt.date(2020, 9, 1) and p.dates[-1] <= dt.date(2021, 11, 30)


def test_stcln_vegetation_gate_on_mtlcc():
    """STCLN masks a date only when > 90 % of the 48×48 tile has NDVI > 0.2 (L1C x10 B8/B4). On a mostly
    agricultural Bavarian tile that holds on a good part of the growing season and rarely otherwise.

    Expected range (justification): in June–July every crop has a closed canopy or ripening straw (L1C NDVI
    ≳ 0.25) and meadows, hedges and woods are green, so most cloud-free dates pass; in April–May a tile
    fails whenever spring crops still on bare soil (L1C NDVI ≈ 0.1–0.18; maize alone is ~18 % of the
    fields) or a village cover more than 10 % of it; in August–September it depends on how much stubble,
    straw mulch and catch crop the cereal fields carry. So roughly 40–75 % of the cloud-free April–September
    dates, > 65 % in June–July, few winter dates (spring-crop fields bare) and no date with a quarter of the
    tile under cloud. Before the post-harvest residue / catch-crop mulch / background mix fix: 32–34 %
    (docs/simulator.md).
    """
    torch = pytest.importorskip("torch")
    from sitskit.pretrain.masking import vegetation_eligibility

    rows = []
    for tid in range(20):
        for year in (2016, 2017):
            t = simulate_mtlcc_tile(tid, year, size=48, seed=1)
            x = torch.from_numpy(t.x10[None].transpose(0, 1, 4, 2, 3) * 1e-4)  # [1, T, 4, H, W], reflectance
            ok = vegetation_eligibility(x, 0, 3)[0].numpy()  # B4 = ch0, B8 = ch3, as in STCLN
            assert not ok[t.n_obs:].any(), "padded dates are never eligible"
            n = t.n_obs
            month = np.array([(dt.date(year, 1, 1) + dt.timedelta(days=int(d) - 1)).month for d in t.doy[:n]])
            rows.append(np.stack([month, t.cloud_mask.mean(axis=(1, 2)), ok[:n]], axis=1))
    month, cloud, ok = np.concatenate(rows).T
    ok = ok.astype(bool)
    clear = cloud == 0
    growing = clear & (month >= 4) & (month <= 9)
    assert growing.sum() > 300
    assert 0.40 <= ok[growing].mean() <= 0.75, ok[growing].mean()
    assert ok[clear & np.isin(month, [6, 7])].mean() > 0.65
    assert ok[clear & np.isin(month, [11, 12, 1, 2])].mean() < 0.2
    assert ok[cloud > 0.25].mean() < 0.03
