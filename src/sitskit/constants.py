"""Dataset facts shared by the simulator, data_prep, datasets, models and metrics.

Sources: the PASTIS release and the MTLCC release (docs/simulator.md).
"""
from __future__ import annotations

import datetime as _dt

# --------------------------------------------------------------------------------------------- PASTIS
PASTIS_CLASSES: list[str] = [
    "Background", "Meadow", "Soft winter wheat", "Corn", "Winter barley", "Winter rapeseed",
    "Spring barley", "Sunflower", "Grapevine", "Beet", "Winter triticale", "Winter durum wheat",
    "Fruits, vegetables, flowers", "Potatoes", "Leguminous fodder", "Soybeans", "Orchard",
    "Mixed cereal", "Sorghum", "Void label",
]
PASTIS_BACKGROUND = 0
PASTIS_VOID = 19
PASTIS_NUM_CLASSES = 20
# Parcel counts of the real dataset (images/Nomenclature.png): the class imbalance to imitate.
PASTIS_PARCEL_COUNTS: dict[int, int] = {
    1: 31292, 2: 8206, 3: 13123, 4: 2766, 5: 1769, 6: 908, 7: 1355, 8: 10640, 9: 871, 10: 1208,
    11: 1704, 12: 2619, 13: 551, 14: 3174, 15: 1212, 16: 2998, 17: 848, 18: 707, 19: 35924,
}
# Display colours (RGB 0-255); ours, not the reference's colormap.txt. 0 black, 19 white as there.
PASTIS_COLORS: list[tuple[int, int, int]] = [
    (0, 0, 0), (122, 189, 82), (230, 196, 60), (242, 130, 30), (173, 140, 50), (250, 240, 40),
    (200, 170, 110), (250, 170, 200), (130, 40, 110), (190, 60, 60), (160, 120, 40), (215, 170, 90),
    (60, 120, 200), (140, 90, 60), (70, 170, 160), (30, 90, 40), (40, 150, 60), (190, 190, 140),
    (250, 90, 60), (255, 255, 255),
]
PASTIS_BANDS: list[str] = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
PASTIS_S1_BANDS: list[str] = ["VV", "VH", "VV/VH"]
PASTIS_REFERENCE_DATE = _dt.date(2018, 9, 1)  # day offsets are counted from here (reference loader)
PASTIS_TILES: list[str] = ["t30uxv", "t31tfj", "t31tfm", "t32ulu"]
PASTIS_CRS = "EPSG:2154"
# Official cross-validation sequence: (train folds, val fold, test fold).
PASTIS_FOLD_SEQUENCE: list[tuple[list[int], int, int]] = [
    ([1, 2, 3], 4, 5), ([2, 3, 4], 5, 1), ([3, 4, 5], 1, 2), ([4, 5, 1], 2, 3), ([5, 1, 2], 3, 4),
]

# ---------------------------------------------------------------------------------------------- MTLCC
# Original class ids (classes.txt rows "id|name"); contiguous index = row position (0 = unknown).
MTLCC_CLASSES: dict[int, str] = {
    0: "unknown", 1: "sugar beet", 2: "summer oat", 3: "meadow", 5: "rape", 8: "hop",
    9: "winter spelt", 12: "winter triticale", 13: "beans", 15: "peas", 16: "potato",
    17: "soybeans", 19: "asparagus", 22: "winter wheat", 23: "winter barley", 24: "winter rye",
    25: "summer barley", 26: "maize",
}
MTLCC_UNKNOWN = 0
MTLCC_ORIGINAL_IDS: list[int] = sorted(MTLCC_CLASSES)
# Band order inside the records (DeepSatModels' converter; consistent with STCLN's NDVI = (ch3-ch0)/(ch3+ch0)).
MTLCC_X10_BANDS: list[str] = ["B4", "B3", "B2", "B8"]
MTLCC_X20_BANDS: list[str] = ["B5", "B6", "B7", "B8A", "B11", "B12"]
MTLCC_X60_BANDS: list[str] = ["B1", "B9", "B10"]
MTLCC_BANDS: list[str] = MTLCC_X10_BANDS + MTLCC_X20_BANDS + MTLCC_X60_BANDS  # 13 channels after upsampling
MTLCC_YEARS: list[int] = [2016, 2017]
MTLCC_TILE_PX: dict[int, int] = {480: 48, 240: 24}  # folder name (metres) -> pixels at 10 m
MTLCC_SRID = 32632  # UTM 32N (Bavaria)

# ------------------------------------------------------------------------------------------ Sentinel-2
S2_WAVELENGTH_NM: dict[str, int] = {
    "B1": 443, "B2": 490, "B3": 560, "B4": 665, "B5": 705, "B6": 740, "B7": 783, "B8": 842,
    "B8A": 865, "B9": 945, "B10": 1375, "B11": 1610, "B12": 2190,
}
S2_RESOLUTION_M: dict[str, int] = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10, "B8A": 20,
    "B9": 60, "B10": 60, "B11": 20, "B12": 20,
}
REFLECTANCE_SCALE = 10000  # int16 digital numbers = reflectance x 10 000

