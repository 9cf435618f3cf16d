"""`python data_prep.py geotiff …`: your own region's GeoTIFF scenes (+ parcels) -> sitskit HDF5.

The body lives in sitskit.geo.convert (needs the `sitskit[geo]` extra); this module only adds the
subcommand to the parser (docs/own_region.md).
"""
from __future__ import annotations

from sitskit.data_prep.commands import add_output_options


def register_geotiff(sub) -> None:
    """Add the `geotiff` subcommand (same --out/--workers/--resume/--skip-bad/--force/--compression as
    `pastis`, without --root)."""
    p = sub.add_parser("geotiff", help="convert dated GeoTIFF scenes (+ parcel polygons) to one HDF5 file",
                       description="One multi-band GeoTIFF per date, all on one grid; optional parcel "
                                   "polygons with a crop-code field (or a label raster) for training. "
                                   "See docs/own_region.md.")
    p.add_argument("--images", required=True, nargs="+", help="folder(s), glob(s) or files of the scenes")
    p.add_argument("--dates-csv", help="CSV 'path,date' instead of dates in the file names")
    p.add_argument("--date-regex", help=r"regex with one group YYYYMMDD (default '_(\d{8})', i.e. *_YYYYMMDD*.tif)")
    p.add_argument("--bands", nargs="+", help="band names in file order (default: PASTIS B2 B3 B4 B5 B6 B7 B8 B8A B11 B12)")
    p.add_argument("--cloud-masks", nargs="+", help="folder/glob of 1-band masks named like the scenes (non-zero = cloudy)")
    p.add_argument("--cloud-band", type=int, help="1-based band of each scene that is a cloud mask (non-zero = cloudy)")
    p.add_argument("--labels", help="parcel polygons (GeoPackage / GeoJSON / Shapefile)")
    p.add_argument("--class-field", help="field of --labels holding the crop code")
    p.add_argument("--class-map", help="CSV 'code,class' from crop codes to class names")
    p.add_argument("--label-raster", help="label raster on the image grid (codes via --class-map, else class indices)")
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=None, help="patch step in px (default: the patch size)")
    p.add_argument("--split-block", type=int, default=1024, help="side in px of the spatial blocks of the split")
    p.add_argument("--seed", type=int, default=0, help="seed of the block split")
    p.add_argument("--reference-date", help="day 0 of the date encoding (default: 1 September before the first date)")
    add_output_options(p)
    p.set_defaults(func=_geotiff)


def _geotiff(args) -> int:
    from sitskit.geo.convert import convert_geotiff
    path = convert_geotiff(
        args.images, args.out, workers=args.workers, resume=args.resume, skip_bad=args.skip_bad,
        force=args.force, compression=args.compression, dates_csv=args.dates_csv, date_regex=args.date_regex,
        bands=args.bands, cloud_masks=args.cloud_masks, cloud_band=args.cloud_band, labels=args.labels,
        class_field=args.class_field, class_map=args.class_map, label_raster=args.label_raster,
        patch_size=args.patch_size, stride=args.stride, split_block=args.split_block, seed=args.seed,
        reference_date=args.reference_date)
    print(f"wrote {path}")
    return 0
