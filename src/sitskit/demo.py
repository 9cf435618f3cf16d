"""`make demo`: the main job end to end on simulated data, with the commands a user would type.

simulate (PASTIS format) -> data_prep (HDF5) -> info -> pretrain -> finetune with few labels (from the
pre-trained encoder) -> evaluate -> predict -> MLflow. A user with the real PASTIS folder runs the same
commands from step 2 on.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str]) -> None:
    """Echo and run one step; stop the demo with that step's exit code on failure."""
    shown = [("python" if c == sys.executable else c) for c in cmd]
    print(f"\n$ {shlex.join(shown)}", flush=True)
    code = subprocess.call(cmd, cwd=REPO)
    if code:
        sys.exit(f"demo: step failed with exit code {code}: {shlex.join(shown)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output", help="working folder (relative to the repo)")
    parser.add_argument("--patches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    raw, h5, ckpt = out / "PASTIS", out / "pastis.h5", out / "checkpoints"
    py = sys.executable
    launch = [py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]

    if not (raw / "metadata.geojson").exists():
        run([py, "data_prep.py", "simulate", "--format", "pastis", "--out", str(raw),
             "--patches", str(args.patches), "--seed", str(args.seed), "--with-s1"])
    run([py, "data_prep.py", "show", str(raw), "--patch", "first", "--out", str(out / "patch.png")])
    if not h5.exists():  # --resume: continue a conversion an interrupted demo left as .partial
        run([py, "data_prep.py", "pastis", "--root", str(raw), "--out", str(h5), "--sats", "S2", "S1A", "S1D",
             "--workers", "2", "--resume"])
    run([py, "data_prep.py", "info", str(h5)])
    run(launch + ["pretrain.py", "--config", "demo", "--data.path", str(h5), "--output.dir", str(ckpt),
                  "--output.overwrite", "true"])
    run(launch + ["finetune.py", "--config", "demo", "--data.path", str(h5), "--output.dir", str(ckpt),
                  "--model.pretrained", str(ckpt / "demo" / "encoder"), "--output.overwrite", "true"])
    run([py, "finetune.py", "evaluate", "--checkpoint", str(ckpt / "demo-finetune"), "--data", str(h5),
         "--split", "test", "--protocol", "utae"])
    pred = out / "predictions.h5"
    run([py, "finetune.py", "predict", "--checkpoint", str(ckpt / "demo-finetune"), "--data", str(h5),
         "--split", "test", "--out", str(pred), "--overwrite"])
    test = json.loads((ckpt / "demo-finetune" / "test" / "metrics.json").read_text())
    print(f"""
Demo finished.
  patch figure      {out / 'patch.png'}
  HDF5 dataset      {h5}
  pre-trained       {ckpt / 'demo' / 'encoder'}
  fine-tuned        {ckpt / 'demo-finetune' / 'model'}   test mIoU {test['mIoU']:.3f}, OA {test['OA']:.3f} (sitskit protocol)
  test figures      {ckpt / 'demo-finetune' / 'test'}/*.png
  predictions       {pred}
  MLflow runs       .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
