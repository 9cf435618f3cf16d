"""`pastis`, `mtlcc`, `info` and `verify` subcommands of `python data_prep.py`."""
from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="source dataset folder")
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--out, --workers, --resume, --skip-bad, --force, --compression: every conversion command's."""
    p.add_argument("--out", required=True, help="output .h5 file (written atomically)")
    p.add_argument("--workers", type=int, default=0, help="reader processes (0: read in the main process)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion of --out")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad patches and write <out>.skipped.json instead of stopping")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--compression", default="zstd", metavar="zstd[:1-9]|gzip[:1-9]|none",
                   help="byte-shuffle + zstd in Blosc (default, level 5; readers need hdf5plugin) or "
                        "shuffle + gzip (level 4; readable by any HDF5 tool, ~3.5x slower to read)")


def _pastis(args) -> int:
    from .pastis import convert_pastis
    path = convert_pastis(args.root, args.out, sats=args.sats, workers=args.workers, resume=args.resume,
                          skip_bad=args.skip_bad, force=args.force, compression=args.compression)
    print(f"wrote {path}")
    return 0


def _mtlcc(args) -> int:
    from .mtlcc import convert_mtlcc
    path = convert_mtlcc(args.root, args.out, years=args.years, size=args.size, workers=args.workers,
                         resume=args.resume, skip_bad=args.skip_bad, force=args.force,
                         compression=args.compression)
    print(f"wrote {path}")
    return 0


def _info(args) -> int:
    from .info import summarize
    print(summarize(args.file))
    return 0


def _verify(args) -> int:
    from .verify import run_verify
    return run_verify(args.file)


def register(sub) -> None:
    """Add the conversion subcommands to the data_prep parser."""
    p = sub.add_parser("pastis", help="convert a PASTIS / PASTIS-R folder to one HDF5 file")
    _common(p)
    p.add_argument("--sats", nargs="+", default=["S2"], choices=["S2", "S1A", "S1D"],
                   help="series to convert (S1A/S1D need PASTIS-R)")
    p.set_defaults(func=_pastis)
    p = sub.add_parser("mtlcc", help="convert MTLCC gzip TFRecords to one HDF5 file")
    _common(p)
    p.add_argument("--years", nargs="+", type=int, default=[2016, 2017], help="series years (data16, data17)")
    p.add_argument("--size", type=int, choices=[480, 240], default=480, help="tile set (480 m = 48 px)")
    p.set_defaults(func=_mtlcc)
    from .geotiff import register_geotiff
    register_geotiff(sub)  # your own region (docs/own_region.md)
    p = sub.add_parser("info", help="summarise a converted HDF5 file")
    p.add_argument("file")
    p.set_defaults(func=_info)
    p = sub.add_parser("verify", help="read every chunk of a converted HDF5 file and check its checksums",
                       description="Reads every chunk of every dataset (format 2: Fletcher32 checksums). "
                                   "Prints one line per corrupt patch; exit 0 when clean, 1 when corrupt.")
    p.add_argument("file")
    p.set_defaults(func=_verify)
