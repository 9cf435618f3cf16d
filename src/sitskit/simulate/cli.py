"""`data_prep.py simulate …` and `data_prep.py show …`."""
from __future__ import annotations

import argparse

from sitskit.errors import UserFacingError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(sub) -> None:
    """Add the simulate/show subcommands to the data_prep parser."""
    p = sub.add_parser(
        "simulate", help="write a simulated PASTIS or MTLCC dataset in the real on-disk format",
        description="Simulate Sentinel-2 crop time series (parcels, phenology, clouds) and write them in "
                    "the exact PASTIS (npy + geojson) or MTLCC (gzip TFRecord) layout. Deterministic per seed.")
    p.add_argument("--format", required=True, choices=["pastis", "mtlcc", "geotiff"],
                   help="dataset layout to write (geotiff: one scene as dated GeoTIFFs + parcels.gpkg, "
                        "docs/own_region.md)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--patches", type=int, default=8, help="number of patches (PASTIS) or tiles (MTLCC)")
    p.add_argument("--size", type=int, default=None,
                   help="patch size in px: PASTIS default 128; MTLCC 48 (folder 480, default) or 24 (240)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-s1", action="store_true", help="PASTIS-R: also write Sentinel-1 S1A/S1D series")
    p.add_argument("--year", type=int, nargs="+", default=None,
                   help="PASTIS: harvest year (default 2019: Sept 2018 - Nov 2019); "
                        "MTLCC: the years to write (default 2016 2017 -> data16, data17)")
    p.add_argument("--ids", type=_int_list, default=None,
                   help="explicit comma-separated patch/tile ids (e.g. 10000,10001,40562); overrides --patches")
    p.add_argument("--test-ids", type=_int_list, default=None,
                   help="MTLCC: tiles for tileids/test_fold0.tileids (simulated too; the others go to train)")
    p.add_argument("--eval-ids", type=_int_list, default=None,
                   help="MTLCC: tiles for tileids/eval.tileids (simulated too; the others go to train)")
    p.add_argument("--workers", type=int, default=0,
                   help="PASTIS/MTLCC: simulate patches in this many processes (0: in the main process); "
                        "the files are the same for any number")
    p.set_defaults(func=run_simulate)

    s = sub.add_parser("show", help="plot one patch/tile of a PASTIS or MTLCC directory to a PNG",
                       description="One figure: RGB at several dates, NDVI curves of a few parcels, semantic "
                                   "labels and instances.")
    s.add_argument("dir", help="dataset root (PASTIS: with metadata.geojson; MTLCC: with 480/ or 240/)")
    s.add_argument("--patch", default="first",
                   help="PASTIS ID_PATCH or MTLCC tile id, or 'first' (default): the smallest id")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--year", type=int, default=None, help="MTLCC: which year to show (default: first)")
    s.set_defaults(func=run_show)


def run_simulate(args) -> int:
    from . import simulate_mtlcc, simulate_pastis

    if args.patches is not None and args.patches < 1 and args.ids is None:
        raise UserFacingError(f"--patches {args.patches}: must be >= 1")
    if args.workers < 0:
        raise UserFacingError(f"--workers {args.workers}: must be >= 0")
    if args.format == "geotiff":  # one scene (--size px, default 256), not --patches patches
        from .geotiff import simulate_geotiff
        if args.with_s1 or args.ids or args.test_ids or args.eval_ids or args.workers:
            raise UserFacingError("--with-s1/--ids/--test-ids/--eval-ids/--workers: not for --format geotiff "
                                  "(one S2 scene)")
        out = simulate_geotiff(args.out, size=args.size or 256, seed=args.seed,
                               year=args.year[0] if args.year else 2019)
        print(f"wrote {out}")
        return 0
    if args.format == "pastis":
        if args.test_ids is not None or args.eval_ids is not None:
            raise UserFacingError("--test-ids/--eval-ids are MTLCC split files; PASTIS splits are the Fold "
                                  "column (assigned round-robin over the sorted ids)")
        if args.year is not None and len(args.year) != 1:
            raise UserFacingError(f"--year {args.year}: PASTIS takes one harvest year")
        year = args.year[0] if args.year else 2019
        out = simulate_pastis(args.out, n_patches=args.patches, size=args.size or 128, seed=args.seed,
                              with_s1=args.with_s1, ids=args.ids, year=year, workers=args.workers)
    else:
        if args.with_s1:
            raise UserFacingError("--with-s1: Sentinel-1 exists only for PASTIS (PASTIS-R), not MTLCC")
        out = simulate_mtlcc(args.out, n_tiles=args.patches, size=args.size or 48, seed=args.seed,
                             years=tuple(args.year) if args.year else (2016, 2017), ids=args.ids,
                             test_ids=args.test_ids, eval_ids=args.eval_ids, workers=args.workers)
    print(f"wrote {out}")
    return 0


def run_show(args) -> int:
    from .show import show

    patch = args.patch
    if patch != "first":
        try:
            patch = int(patch)
        except ValueError:
            raise UserFacingError(f"--patch {patch!r}: give an integer id or 'first'") from None
    out = show(args.dir, patch, args.out, year=args.year)
    print(f"wrote {out}")
    return 0
