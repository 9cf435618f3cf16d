"""Per-class crop calendars -> cover fractions over time.

Time `t` is the *season day*: days since 1 January of the harvest year (negative in the preceding autumn,
e.g. PASTIS Sept 2018 = about -120 for harvest year 2019). Each region gets fractions of the spectral
endmembers (see `spectra.ENDMEMBERS`) per date; bare soil is what is left. Calendars follow
`crop_phenology.md` (northern France / Bavaria); every parcel jitters them (common shift + per-stage
noise + canopy density), and the `year` shifts all biological dates (a warm spring comes early).
"""
from __future__ import annotations

import numpy as np

from .parcels import BORDER, CONIFER, FOREST, URBAN, WATER

# Cover fractions returned per region and date; soil = 1 - sum.
COMPONENTS = ("green", "senescent", "flower", "water", "urban", "shade")

# Annual crops: sow, winter canopy (autumn-sown), spring green-up midpoint and width, peak cover,
# senescence midpoint and width, harvest day (season days), optional per-stage jitter (days, default 4;
# corn is sown over a month and harvested for silage or grain). Values follow crop_phenology.md.
_C = dict
CROPS: dict[str, dict[str, float]] = {
    #                 sow  winter  up  k_up peak  sen k_sen harvest
    "soft_wheat": _C(sow=-75, winter=0.30, up=80, k_up=9, peak=0.92, sen=165, k_sen=6, harvest=192),
    "durum_wheat": _C(sow=-64, winter=0.25, up=80, k_up=8, peak=0.88, sen=159, k_sen=5, harvest=186),
    "triticale": _C(sow=-78, winter=0.34, up=84, k_up=10, peak=0.93, sen=173, k_sen=6, harvest=200),
    "mixed_cereal": _C(sow=-72, winter=0.30, up=80, k_up=9, peak=0.88, sen=163, k_sen=6, harvest=195),
    "spelt": _C(sow=-70, winter=0.28, up=86, k_up=9, peak=0.90, sen=172, k_sen=6, harvest=205),
    "winter_rye": _C(sow=-85, winter=0.35, up=72, k_up=8, peak=0.90, sen=155, k_sen=6, harvest=190),
    "winter_barley": _C(sow=-88, winter=0.35, up=66, k_up=8, peak=0.90, sen=148, k_sen=5, harvest=176),
    "rapeseed": _C(sow=-125, winter=0.70, up=60, k_up=10, peak=0.92, sen=165, k_sen=6, harvest=188),
    "spring_barley": _C(sow=55, winter=0.0, up=110, k_up=8, peak=0.88, sen=170, k_sen=5, harvest=200),
    "summer_oat": _C(sow=70, winter=0.0, up=120, k_up=8, peak=0.88, sen=190, k_sen=6, harvest=222),
    "peas": _C(sow=70, winter=0.0, up=118, k_up=7, peak=0.80, sen=172, k_sen=5, harvest=192),
    "beans": _C(sow=85, winter=0.0, up=135, k_up=8, peak=0.85, sen=200, k_sen=6, harvest=225),
    "corn": _C(sow=115, winter=0.0, up=170, k_up=7, peak=0.93, sen=250, k_sen=7, harvest=275, jitter=7),
    "sorghum": _C(sow=118, winter=0.0, up=174, k_up=15, peak=0.86, sen=262, k_sen=13, harvest=285, jitter=7),
    "sunflower": _C(sow=110, winter=0.0, up=160, k_up=8, peak=0.82, sen=215, k_sen=6, harvest=255),
    "beet": _C(sow=85, winter=0.0, up=150, k_up=10, peak=0.93, sen=285, k_sen=12, harvest=295),
    "potatoes": _C(sow=100, winter=0.0, up=150, k_up=7, peak=0.90, sen=205, k_sen=2, harvest=235),
    "soybeans": _C(sow=130, winter=0.0, up=180, k_up=8, peak=0.88, sen=250, k_sen=6, harvest=272),
}
# Perennial programs (handled in `_perennial`) and background cover programs.
PERENNIALS = ("meadow", "fodder", "grapevine", "orchard", "hop", "asparagus", "vegetables")
BACKGROUND_PROGRAMS = {FOREST: "forest", CONIFER: "conifer", URBAN: "urban", WATER: "water",
                       BORDER: "border"}

# Class id -> program. PASTIS ids from constants.PASTIS_CLASSES; MTLCC original ids.
PASTIS_PROGRAMS: dict[int, str] = {
    1: "meadow", 2: "soft_wheat", 3: "corn", 4: "winter_barley", 5: "rapeseed", 6: "spring_barley",
    7: "sunflower", 8: "grapevine", 9: "beet", 10: "triticale", 11: "durum_wheat", 12: "vegetables",
    13: "potatoes", 14: "fodder", 15: "soybeans", 16: "orchard", 17: "mixed_cereal", 18: "sorghum",
}
MTLCC_PROGRAMS: dict[int, str] = {
    1: "beet", 2: "summer_oat", 3: "meadow", 5: "rapeseed", 8: "hop", 9: "spelt", 12: "triticale",
    13: "beans", 15: "peas", 16: "potatoes", 17: "soybeans", 19: "asparagus", 22: "soft_wheat",
    23: "winter_barley", 24: "winter_rye", 25: "spring_barley", 26: "corn",
}

# Year -> (phenology shift in days, cloud probability factor, rain events per 10 days). Years not listed
# get a deterministic pseudo-random climate from the year number.
YEAR_CLIMATE: dict[int, tuple[float, float, float]] = {
    2016: (6.0, 1.15, 1.6), 2017: (-7.0, 0.9, 1.0), 2018: (-3.0, 1.0, 1.2), 2019: (0.0, 1.0, 1.2),
}


def year_climate(year: int) -> tuple[float, float, float]:
    """(phenology shift days, cloud factor, rain rate) of a season; deterministic in `year`."""
    if year in YEAR_CLIMATE:
        return YEAR_CLIMATE[year]
    r = np.random.default_rng([year, 7])
    return float(r.uniform(-8, 8)), float(r.uniform(0.85, 1.15)), float(r.uniform(0.9, 1.6))


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


def _window(t, start, end, k):
    """Smooth 0→1→0 bump: on after `start`, off after `end` (width k days)."""
    return _sig((t - start) / k) * (1 - _sig((t - end) / k))


def _annual(p: dict[str, np.ndarray], t: np.ndarray) -> dict[str, np.ndarray]:
    """Annual crop [R, T] fractions from per-region parameter arrays `p` (each [R, 1])."""
    emerged = _sig((t - (p["sow"] + 20)) / 6)
    winter = p["winter"] * emerged
    spring = p["peak"] * _sig((t - p["up"]) / p["k_up"]) * (t >= p["sow"])
    canopy = np.maximum(winter, spring)
    sen = _sig((t - p["sen"]) / p["k_sen"])
    before = t < p["harvest"]
    green = canopy * (1 - sen) * before
    senescent = np.maximum(canopy, p["peak"]) * sen * 0.9 * before
    # Before sowing: stubble of the previous crop or a catch crop, which is killed by frost (or sprayed)
    # around late November and lies on the field as mulch until the spring crop is sown into it.
    prev = t < p["sow"]
    catch_alive = _sig((t + 140) / 10) * (1 - _sig((t + 40) / 8))
    green = green + prev * p["catch"] * catch_alive
    senescent = senescent + prev * (0.12 + 1.2 * p["catch"] * _sig((t + 40) / 8))
    # After harvest: chopped straw and stubble (residue cover 45-80 %, worked into the soil by stubble
    # tillage over ~5 weeks), then volunteers or a sown catch crop on part of the fields.
    after = ~before
    regrow = p["regrow"] * _sig((t - p["harvest"] - 30) / 10)
    green = green + after * regrow
    senescent = senescent + after * p["residue"] * np.exp(-np.maximum(t - p["harvest"], 0) / 35)
    out = {"green": green, "senescent": senescent}
    if "flower_day" in p:  # rapeseed: yellow flowers for ~3 weeks in April, partly covering the leaves
        flower = 0.5 * np.exp(-0.5 * ((t - p["flower_day"]) / 8) ** 2) * before
        out["flower"] = flower
        out["green"] = green * (1 - 0.6 * flower)
    return out


def _mowing(t, cuts, depth, regrowth):
    """Multiplicative canopy loss after each cut (NaN = no cut): [R, T]."""
    dt = t[None, :] - cuts[:, :, None]  # [R, C, T]
    loss = np.where(dt >= 0, depth[:, None, None] * np.exp(-np.nan_to_num(dt, nan=1e9) / regrowth), 0.0)
    loss = np.where(np.isnan(cuts)[:, :, None], 0.0, loss)
    return np.prod(1 - loss, axis=1)


def _perennial(name: str, n: int, t: np.ndarray, rng: np.random.Generator, shift: np.ndarray):
    """Fractions [n, T] for perennial crops and cover types; `shift` [n, 1] days."""
    z = np.zeros((n, len(t)))
    tt = t[None, :] - shift
    leaf_on = _window(tt, 115 + rng.normal(0, 4, (n, 1)), 300 + rng.normal(0, 5, (n, 1)), 8)
    if name in ("meadow", "fodder"):
        base = rng.uniform(0.5, 0.62, (n, 1))
        growth = base + (0.88 - base) * _window(tt, 75, 200, 15) + 0.1 * _window(tt, 240, 300, 12)
        ncut = 5 if name == "fodder" else 4
        cuts = rng.uniform(125, 265, (n, ncut)) + shift
        cuts = np.sort(cuts, axis=1)
        keep = rng.random((n, ncut)) < (0.85 if name == "fodder" else 0.6)
        cuts = np.where(keep, cuts, np.nan)
        factor = _mowing(t, cuts, rng.uniform(0.45, 0.65, n), 14.0 if name == "fodder" else 18.0)
        green = np.clip(growth * factor, 0, 0.95)
        return {"green": green, "senescent": (growth - green) * 0.6}
    if name == "grapevine":
        grass = rng.choice([0.0, 0.2], size=(n, 1), p=[0.6, 0.4])
        green = 0.06 + 0.38 * leaf_on + grass * (1 - 0.5 * _window(tt, 150, 260, 10))
        return {"green": green, "senescent": 0.18 + z + 0.25 * _window(tt, 285, 320, 6)}
    if name == "orchard":
        green = 0.22 + 0.42 * leaf_on + 0.12
        return {"green": green, "senescent": 0.1 + z, "shade": 0.12 + z}
    if name == "hop":  # bare poles in winter, fast climb May-Aug, whole bines cut at harvest
        harvest = 245 + rng.normal(0, 6, (n, 1))
        green = 0.82 * _sig((tt - 160) / 10) * (tt < harvest)
        return {"green": green, "senescent": 0.12 + z + 0.2 * (tt >= harvest)}
    if name == "asparagus":  # ridges of bare soil Apr-Jun (harvest), then fern canopy Jul-Oct
        green = 0.75 * _window(tt, 190, 290, 9)
        return {"green": green, "senescent": 0.5 * _window(tt, 290, 330, 8) + 0.05}
    if name == "vegetables":  # one or two short cycles per parcel at random times
        green = z.copy()
        for _ in range(2):
            start = rng.uniform(60, 230, (n, 1))
            length = rng.uniform(50, 95, (n, 1))
            on = rng.random((n, 1)) < 0.8
            green = green + on * rng.uniform(0.5, 0.85, (n, 1)) * _window(t[None, :], start, start + length, 5)
        return {"green": np.clip(green, 0, 0.92), "senescent": 0.08 + z}
    if name == "forest":
        return {"green": 0.3 + 0.55 * leaf_on, "senescent": 0.3 * _window(tt, 290, 330, 8) + 0.25 * (1 - leaf_on),
                "shade": 0.15 + z}
    if name == "conifer":
        return {"green": 0.58 + 0.05 * leaf_on, "shade": 0.38 + z}
    if name == "urban":
        return {"urban": 0.85 + z, "green": 0.05 + 0.05 * leaf_on}
    if name == "water":
        return {"water": 0.97 + z}
    if name == "border":  # hedges and roads
        return {"green": 0.25 + 0.3 * leaf_on, "urban": 0.3 + z, "shade": 0.08 + z}
    raise KeyError(name)


def cover_fractions(programs: list[str], t: np.ndarray, rng: np.random.Generator,
                    year_shift: float = 0.0) -> np.ndarray:
    """Endmember fractions per region and date.

    programs: one program name per region (see CROPS, PERENNIALS, BACKGROUND_PROGRAMS).
    t: [T] season days. Returns float32 [R, T, len(COMPONENTS)] (soil = 1 - sum, clipped >= 0).
    """
    t = np.asarray(t, dtype=np.float64)
    r_total = len(programs)
    out = np.zeros((r_total, len(t), len(COMPONENTS)), dtype=np.float64)
    names = np.asarray(programs)
    for name in sorted(set(programs)):
        idx = np.flatnonzero(names == name)
        n = len(idx)
        common = year_shift + rng.normal(0, 3.0, (n, 1))  # per-parcel sowing/weather offset
        if name in CROPS:
            base = CROPS[name]
            p = {}
            for key in ("sow", "up", "sen", "harvest"):
                # variety, local weather: stages vary partly independently
                p[key] = base[key] + common + rng.normal(0, base.get("jitter", 4.0), (n, 1))
            p["sow"] = np.minimum(p["sow"], p["up"] - 30)
            p["k_up"] = base["k_up"] * rng.uniform(0.85, 1.15, (n, 1))
            p["k_sen"] = base["k_sen"] * rng.uniform(0.85, 1.15, (n, 1))
            p["peak"] = np.minimum(base["peak"] * rng.uniform(0.88, 1.04, (n, 1)), 0.95)
            p["winter"] = base["winter"] * rng.uniform(0.65, 1.3, (n, 1))
            p["catch"] = (base["winter"] == 0) * (rng.random((n, 1)) < 0.3) * rng.uniform(0.2, 0.45, (n, 1))
            p["regrow"] = (rng.random((n, 1)) < 0.5) * rng.uniform(0.15, 0.5, (n, 1))
            p["residue"] = rng.uniform(0.45, 0.8, (n, 1))
            if name == "rapeseed":
                p["flower_day"] = 108 + common + rng.normal(0, 3, (n, 1))
            comps = _annual(p, t[None, :])
        else:
            comps = _perennial(name, n, t, rng, common)
        for key, val in comps.items():
            out[idx, :, COMPONENTS.index(key)] = np.broadcast_to(val, (n, len(t)))
    # Never more than full cover: rescale the vegetation/material components if they exceed 1.
    total = out.sum(-1, keepdims=True)
    out = np.where(total > 1, out / np.maximum(total, 1e-9), out)
    return np.clip(out, 0, 1).astype(np.float32)
