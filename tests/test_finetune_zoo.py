"""Every segmentation model of the zoo trains and evaluates through finetune.py (a 2-step run on the shared
tiny simulated PASTIS: train folds 1-3, test fold 5, full 32x32 patches, 6 dates)."""
import json

import pytest

from sitskit.finetune.main_finetune import main

ZOO = ["utae", "stcln", "stenn", "fcn_lstm", "convlstm", "convgru", "uconvlstm", "ubiconvlstm", "unet3d",
       "fpn_convlstm", "utae_single_date", "utae_skip_mean", "utae_mean_attention", "utae_batchnorm"]


@pytest.mark.parametrize("name", ZOO)
def test_model_trains_and_is_scored_through_finetune(name, pastis_h5, tmp_path):
    code = main(["--data.path", str(pastis_h5), "--data.folds", "[1,2,3]", "--data.test_folds", "[5]",
                 "--data.num_dates", "6", "--data.eval_num_dates", "6", "--data.batch_size", "2",
                 "--model.name", name, "--train.max_steps", "2", "--run.tracking", "false", "--run.progress", "false",
                 "--output.dir", str(tmp_path), "--output.name", name])
    assert code == 0
    metrics = json.loads((tmp_path / name / "test" / "metrics.json").read_text())
    assert metrics["n_patches"] == 1 and metrics["n_pixels"] > 0 and 0 <= metrics["OA"] <= 1
    meta = json.loads((tmp_path / name / "model" / "config.json").read_text())
    assert meta["name"] == name
