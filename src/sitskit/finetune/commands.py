"""`finetune.py evaluate | predict | sweep`: use a fine-tuned checkpoint, or run a grid of fine-tunes.

A checkpoint is a fine-tune run folder (`checkpoints/<run>`, whose `model/` holds the best model) or a
`model/` folder itself. Everything a patch needs — bands, standardisation, classes, cut-off — is in its
config.json, so evaluate and predict read the same dates and statistics the model was trained with.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sitskit.errors import UserFacingError, interrupt_exit_code, raise_on_sigterm


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    raise_on_sigterm()
    try:
        if command == "sweep":
            from sitskit.finetune.sweep import main as sweep_main

            return sweep_main(rest)
        args = _parser(command).parse_args(rest)
        return {"evaluate": evaluate_command, "predict": predict_command}[command](args)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (the sweep reports its own)
        print("terminated" if interrupt_exit_code(exc) == 143 else "interrupted", file=sys.stderr)
        return interrupt_exit_code(exc)
    except BrokenPipeError:
        from sitskit.stage.cli import quiet_closed_pipe

        quiet_closed_pipe()
        return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every sitskit error
        raise UserFacingError(f"{self.prog}: {message}")


def _parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"finetune.py {command}", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="HDF5 data file (data_prep.py); the truth for evaluate")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fine-tune run folder (checkpoints/<run>) or its model/ folder")
    if command == "evaluate":
        src.add_argument("--predictions", help="score an existing prediction file (docs/predictions.md)")
        p.add_argument("--protocol", default="sitskit", choices=("sitskit", "utae", "stcln"),
                       help="metric protocol (docs/metrics.md)")
        p.add_argument("--out", help="folder for metrics.json and figures (default: <run>/eval-<selection>, or "
                                     "beside the prediction file)")
        p.add_argument("--figures", type=int, default=3, help="patches drawn in patches.png")
    else:
        p.add_argument("--out", help="prediction file to write (.h5; default with --geotiff: MAP.h5 beside it)")
        p.add_argument("--probs", action="store_true", help="also write per-class probabilities (float16)")
        p.add_argument("--geotiff", help="also write one stitched GeoTIFF map of the area (a geotiff data file; "
                                         "docs/own_region.md); implies --probs for smooth blending, and --all")
        p.add_argument("--parcels", help="with --geotiff: parcel table (GeoPackage) of predicted vs declared class")
        p.add_argument("--prob-bands", action="store_true", help="with --geotiff: per-class probability bands")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--split", help="test | val | train (the run's selections), or an MTLCC/geotiff split name")
    sel.add_argument("--folds", type=int, nargs="+", help="PASTIS folds")
    sel.add_argument("--all", action="store_true", help="every patch of the file")
    p.add_argument("--years", type=int, nargs="+", help="MTLCC years")
    p.add_argument("--window", type=int, help="sliding window size (default: the run's eval.window)")
    p.add_argument("--overlap", type=float, help="sliding window overlap (default: the run's)")
    p.add_argument("--max-doy", type=int, help="early season: dates up to this day of year (default: the run's)")
    p.add_argument("--batch-size", type=int, help="patches per forward (default: the run's data.eval_batch_size)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes reading patches (0: this process)")
    p.add_argument("--max-date", help="early season: dates up to YYYY-MM-DD (default: the run's)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p


# --------------------------------------------------------------------------------------------- checkpoint
def load_checkpoint(path: str) -> tuple[torch.nn.Module, dict, Path]:
    """(model in eval mode, its config.json, run folder)."""
    from sitskit.models import from_pretrained
    from sitskit.models.registry import read_pretrained_config

    p = Path(path)
    model_dir = p / "model" if (p / "model" / "config.json").is_file() else p
    if not (model_dir / "config.json").is_file():
        raise UserFacingError(f"--checkpoint {p}: no model/config.json (expected a finetune.py run folder)")
    meta = read_pretrained_config(model_dir)
    if meta.get("stage") != "finetune" or "class_names" not in meta:
        raise UserFacingError(f"--checkpoint {p}: {model_dir / 'config.json'} is not a fine-tuned model "
                              f"(stage {meta.get('stage')!r}); a pre-trained encoder is fine-tuned first")
    return from_pretrained(model_dir), meta, model_dir.parent if model_dir.name == "model" else model_dir


def checkpoint_dataset(args, meta: dict):
    """The selection of `args` on `args.data`, read like the run read its validation/test patches."""
    import h5py

    from sitskit.finetune.main_finetune import open_dataset, selection

    data = Path(args.data)
    if not data.is_file():
        raise UserFacingError(f"--data {data}: does not exist")
    try:
        with h5py.File(data, "r") as f:
            name = f.attrs.get("dataset")
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f.attrs.get("class_names", [])]
    except OSError as exc:
        raise UserFacingError(f"--data {data}: not a readable HDF5 file ({exc})") from None
    name = name.decode() if isinstance(name, bytes) else name
    if name != meta["dataset"]:
        raise UserFacingError(f"--data {data}: a {name} file; the checkpoint was trained on {meta['dataset']}")
    if classes != list(meta["class_names"]):
        raise UserFacingError(f"--data {data}: its class names differ from the checkpoint's "
                              f"({len(classes)} vs {len(meta['class_names'])} classes)")
    run_data = meta["finetune_config"]["data"]
    if args.all:
        sel, label = {"folds": None, "split": None, "years": args.years, "label_subset": None}, "all"
    elif args.folds:
        sel, label = {"folds": args.folds, "split": None, "years": args.years, "label_subset": None}, \
            "folds" + "".join(map(str, args.folds))
    elif args.split in (None, "test", "val", "train"):
        which = args.split or "test"
        sel = selection(run_data, which)
        if sel is None:
            raise UserFacingError(f"--split {which}: the run has no {which} selection; give --folds or --split NAME")
        if args.years:
            sel["years"] = args.years
        label = which
    else:
        sel, label = {"folds": None, "split": args.split, "years": args.years or run_data["years"] or None,
                      "label_subset": None}, args.split
    max_doy = args.max_doy if args.max_doy is not None else run_data["max_doy"]
    max_date = args.max_date if args.max_date is not None else run_data["max_date"]
    ds = open_dataset(data, label, task="semantic", norm=(meta["norm_mean"], meta["norm_std"]),
                      sat=run_data["sat"], max_doy=max_doy, max_date=max_date,
                      num_dates=run_data.get("eval_num_dates"), seed=meta["finetune_config"]["run"]["seed"], **sel)
    if list(ds.band_names) != list(meta["band_names"]):
        raise UserFacingError(f"--data {data}: bands {ds.band_names} differ from the checkpoint's {meta['band_names']}")
    return ds, label, {"max_doy": max_doy, "max_date": max_date}


def _accelerator(args):
    from accelerate import Accelerator

    return Accelerator(cpu=args.cpu)


def _loader_args(args, meta: dict) -> dict:
    """evaluate()'s batch_size / num_workers from --batch-size / --workers (default: the run's batch size)."""
    batch = args.batch_size if args.batch_size is not None else meta["finetune_config"]["data"]["eval_batch_size"]
    if batch < 1 or args.workers < 0:
        raise UserFacingError(f"--batch-size {batch} / --workers {args.workers}: need >= 1 / >= 0")
    return {"batch_size": batch, "num_workers": args.workers}


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_command(args) -> int:
    from sitskit.finetune.report import metrics_table, write_evaluation

    if args.predictions:
        return evaluate_predictions(args)
    model, meta, run_dir = load_checkpoint(args.checkpoint)
    if meta.get("task") == "panoptic":
        from sitskit.finetune import panoptic_stage

        return panoptic_stage.evaluate_checkpoint(args, model, meta, run_dir)
    ds, label, cutoff = checkpoint_dataset(args, meta)
    acc = _accelerator(args)
    model = model.to(acc.device)
    from sitskit.finetune.engine_finetune import evaluate
    from sitskit.finetune.main_finetune import data_info
    from sitskit.finetune.metrics import compute_metrics
    from sitskit.finetune.report import PatchSampler

    run_eval = meta["finetune_config"]["eval"]
    info = data_info(ds)
    sampler = PatchSampler(args.figures, ds.band_names, ds.norm_mean, ds.norm_std)
    confusion, n = evaluate(model, ds, acc, info["num_classes"],
                            window=args.window if args.window is not None else run_eval["window"],
                            overlap=args.overlap if args.overlap is not None else run_eval["overlap"],
                            on_patch=sampler, progress=True, desc=f"evaluate {label}", **_loader_args(args, meta))
    metrics = compute_metrics(confusion, info["class_names"], args.protocol, **info["protocol_kwargs"],
                              exclude_background=meta["finetune_config"]["loss"]["ignore_background"])
    metrics.update(n_patches=n, cutoff=cutoff, checkpoint=str(run_dir), data=str(Path(args.data).resolve()),
                   selection=label)
    out = Path(args.out) if args.out else run_dir / f"eval-{label}-{args.protocol}"
    with _mlflow_run(meta.get("mlflow_run_id")):
        write_evaluation(out, metrics, info["class_names"], info["void_ids"], sampler.patches,
                         mlflow_prefix=f"eval-{label}-{args.protocol}", class_colors=info["class_colors"])
    print(metrics_table(metrics, f"{label} ({args.protocol})"))
    print(f"\nwrote {out / 'metrics.json'} and figures")
    return 0


def evaluate_predictions(args) -> int:
    from sitskit.finetune.predictions import score_predictions
    from sitskit.finetune.report import metrics_table, write_evaluation

    pred = Path(args.predictions)
    if _has_instances(pred):
        from sitskit.finetune import panoptic_stage

        return panoptic_stage.evaluate_predictions(args)
    keys = None
    if args.folds or args.split or args.years:
        import h5py

        with h5py.File(args.data, "r") as f:
            idx = {k: f["index"][k][()] for k in f["index"]}
        rows = range(len(idx["key"]))
        if args.folds:
            rows = [r for r in rows if int(idx["fold"][r]) in args.folds]
        if args.split:
            rows = [r for r in rows if args.split in (idx["split"][r].decode() if isinstance(idx["split"][r], bytes)
                                                      else str(idx["split"][r])).split(",")]
        if args.years:
            rows = [r for r in rows if int(idx["year"][r]) in args.years]
        keys = [idx["key"][r].decode() if isinstance(idx["key"][r], bytes) else str(idx["key"][r]) for r in rows]
    metrics = score_predictions(pred, args.data, args.protocol, keys=keys)
    metrics.update(predictions=str(pred.resolve()), data=str(Path(args.data).resolve()))
    out = Path(args.out) if args.out else pred.with_name(pred.stem + f"-eval-{args.protocol}")
    write_evaluation(out, metrics, metrics["classes"], [], None)
    print(metrics_table(metrics, f"{pred.name} ({args.protocol})"))
    print(f"\nwrote {out / 'metrics.json'}")
    return 0


# ----------------------------------------------------------------------------------------------- predict
def predict_command(args) -> int:
    from sitskit.finetune.engine_finetune import evaluate
    from sitskit.finetune.main_finetune import data_info
    from sitskit.finetune.predictions import PredictionWriter

    if args.parcels and not args.geotiff:
        raise UserFacingError("--parcels needs --geotiff MAP.tif")
    if args.geotiff:
        args.out = args.out or str(Path(args.geotiff).with_suffix(".h5"))
        args.probs = True
        if not (args.split or args.folds):
            args.all = True
    if not args.out:
        raise UserFacingError("finetune.py predict: give --out PRED.h5 (or --geotiff MAP.tif)")
    model, meta, run_dir = load_checkpoint(args.checkpoint)
    if meta.get("task") == "panoptic":
        from sitskit.finetune import panoptic_stage

        return panoptic_stage.predict_checkpoint(args, model, meta, run_dir)
    ds, label, cutoff = checkpoint_dataset(args, meta)
    acc = _accelerator(args)
    model = model.to(acc.device)
    run_eval = meta["finetune_config"]["eval"]
    info = data_info(ds)
    with PredictionWriter(args.out, args.data, model=meta["name"], checkpoint=str(run_dir),
                          overwrite=args.overwrite) as writer:
        def write(key, image, truth, probs):
            writer.write(key, probs.argmax(0).to(torch.uint8).numpy(),
                         probs.half().numpy() if args.probs else None)

        evaluate(model, ds, acc, info["num_classes"],
                 window=args.window if args.window is not None else run_eval["window"],
                 overlap=args.overlap if args.overlap is not None else run_eval["overlap"],
                 on_patch=write, progress=True, desc=f"predict {label}", **_loader_args(args, meta))
        writer.file.attrs["selection"] = label
        writer.file.attrs["cutoff"] = json.dumps(cutoff)
    print(f"wrote {args.out} ({len(ds.ids)} patches of {args.data})")
    if args.geotiff:
        write_region_maps(args)
    return 0


def write_region_maps(args) -> None:
    """The stitched GeoTIFF (+ parcel table) of a geotiff data file from the prediction file just written."""
    from sitskit.geo.maps import export_maps

    out = export_maps(args.data, args.geotiff, predictions_h5=args.out, parcels_out=args.parcels,
                      prob_bands=args.prob_bands)
    for kind, path in out.items():
        if path is not None:
            print(f"wrote {kind}: {path}")


def _has_instances(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("has_instances", 0))
    except OSError:
        return False  # read_predictions gives the clear error


class _mlflow_run:
    """Log into the fine-tune run's MLflow run when it still exists in the store; otherwise only files."""

    def __init__(self, run_id):
        self.run_id, self.active = run_id, False

    def __enter__(self):
        if self.run_id:
            try:
                from sitskit import tracking

                tracking.start_run("", "", run_id=self.run_id)
                self.active = True
            except Exception:  # noqa: BLE001
                self.active = False
        return self

    def __exit__(self, *exc):
        if self.active:
            import mlflow

            mlflow.end_run()
