"""sitskit.stage.config: typed sections, presets, dotted overrides, one-line errors, --help."""
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from sitskit.errors import UserFacingError
from sitskit.pretrain.config_pretrain import SECTIONS
from sitskit.stage.config import check, flatten, parse_config, preset_path


@dataclass
class Optim:
    lr: float = 1e-4
    """learning rate"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas"""
    schedule: Literal["cosine", "constant"] = "cosine"
    """schedule"""

    def __post_init__(self):
        check(self.lr > 0, f"optim.lr must be > 0; got {self.lr}")


@dataclass
class Model:
    name: str = "m"
    """model"""
    kwargs: dict = field(default_factory=dict)
    """free-form"""
    crop: int | None = None
    """crop"""


S = {"optim": Optim, "model": Model}


def parse(argv):
    return parse_config(argv, S, prog="t", description="t", stage="pretrain")


def test_defaults_preset_and_overrides_layer_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"optim": {"lr": 3e-4, "schedule": "constant"}}))
    cfg = parse(["--config", str(preset), "--optim.schedule", "cosine", "--model.crop", "32"])
    assert cfg["optim"] == {"lr": 3e-4, "betas": [0.9, 0.999], "schedule": "cosine"}
    assert cfg["model"]["crop"] == 32


def test_free_form_kwargs_take_yaml_values_per_key():
    cfg = parse(["--model.kwargs.widths", "[8, 32]", "--model.kwargs.enc", "{n: 2}", "--model.kwargs.a=0.5"])
    assert cfg["model"]["kwargs"] == {"widths": [8, 32], "enc": {"n": 2}, "a": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--optim.lr", "-1"], "optim.lr must be > 0; got -1.0"),
    (["--optim.lr", "abc"], "optim.lr: expected a finite number, got abc"),
    (["--optim.schedule", "linear"], "optim.schedule: expected one of cosine, constant, got linear"),
    (["--optim.betas", "0.9"], "optim.betas"),
    (["--optim.lrr", "1"], "unrecognized arguments: --optim.lrr"),
    (["--config", "no_such_preset"], "no such file, and no shipped preset"),
])
def test_bad_values_are_one_line_naming_the_key(argv, message):
    with pytest.raises(UserFacingError) as err:
        parse(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shipped_presets_resolve_by_name_and_parse():
    path = preset_path("demo", "pretrain")
    assert path.name == "pretrain_demo.yaml" and path.is_file()
    cfg = parse_config(["--config", "demo", "--data.path", "x.h5"], SECTIONS, prog="p", description="d",
                       stage="pretrain")
    assert cfg["model"]["kwargs"]["encoder_kwargs"]["widths"] == [16, 32]
    assert cfg["train"]["mixed_precision"] is None  # left to accelerate
    assert flatten(cfg)["optim.lr"] == 1e-3


def test_help_lists_every_key_with_type_default_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    from sitskit.pretrain.main_pretrain import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for name in cls.__dataclass_fields__:
            assert f"--{section}.{name}" in out, (section, name)
    assert "{time-space,time,space}" in out and "type: float, default: 0.4" in out
    assert "share of eligible entries masked" in out  # the field's comment


def test_print_config_prints_resolved_yaml(capsys):
    from sitskit.pretrain.main_pretrain import main

    assert main(["--config", "demo", "--data.path", "x.h5", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["path"] == "x.h5" and printed["optim"]["lr"] == 1e-3


def test_two_runs_starting_at_once_on_a_fresh_sqlite_store_both_start(tmp_path):
    """MLflow creates a fresh sqlite store's tables on first use; two processes doing that at once raced."""
    import os
    import subprocess
    import sys

    code = ("import sys; from sitskit import tracking; r = tracking.start_run('race', sys.argv[1]); "
            "import mlflow; mlflow.end_run(); print(r.info.run_id)")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'fresh.db'}")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"run{i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 2


def test_overwrite_flag_is_short_for_output_overwrite(capsys):
    from sitskit.pretrain.main_pretrain import main

    assert main(["--config", "demo", "--data.path", "x.h5", "--overwrite", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["overwrite"] is True
