"""sitskit.config: YAML preset + defaults + `--section.key value` overrides."""
import pytest
import yaml

from sitskit.config import flatten, load_config
from sitskit.errors import UserFacingError

DEFAULTS = {
    "run": {"seed": 0, "name": None, "resume": False},
    "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "schedule": "cosine"},
    "data": {"folds": [], "crop": None, "batch_size": 4},
    "model": {"name": "stcln_pretrain", "kwargs": {}},
}


def write(tmp_path, data):
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_preset_and_overrides_layer_in_order(tmp_path):
    preset = write(tmp_path, {"optim": {"lr": 3e-4}, "data": {"folds": [5], "batch_size": 2}})
    cfg = load_config(["--config", preset, "--data.batch_size", "8", "--run.name=exp1"], DEFAULTS)
    assert cfg["optim"]["lr"] == 3e-4  # preset over default
    assert cfg["data"]["folds"] == [5]
    assert cfg["data"]["batch_size"] == 8  # command line over preset
    assert cfg["run"]["name"] == "exp1"
    assert cfg["optim"]["schedule"] == "cosine"  # untouched default
    assert DEFAULTS["optim"]["lr"] == 1e-4  # defaults not mutated


@pytest.mark.parametrize("key, raw, expected", [
    ("optim.lr", "1e-3", 1e-3),
    ("optim.lr", "2", 2.0),
    ("data.batch_size", "16", 16),
    ("data.batch_size", "1e2", 100),
    ("run.resume", "true", True),
    ("run.resume", "no", False),
    ("data.folds", "1,2", [1, 2]),
    ("data.folds", "[3, 4]", [3, 4]),
    ("optim.betas", "0.8,0.95", [0.8, 0.95]),
    ("data.crop", "32", 32),  # default None: YAML typing
    ("data.crop", "null", None),
    ("run.seed", "-3", -3),
])
def test_values_are_coerced_to_the_default_type(key, raw, expected):
    cfg = load_config([f"--{key}", raw], DEFAULTS)
    section, name = key.split(".")
    value = cfg[section][name]
    assert value == expected and type(value) is type(expected)


def test_bare_flag_sets_a_boolean():
    assert load_config(["--run.resume", "--run.seed", "3"], DEFAULTS)["run"] == {"seed": 3, "name": None,
                                                                                "resume": True}


@pytest.mark.parametrize("argv, needle", [
    (["--optim.lrr", "1"], "optim.lrr"),
    (["--optimizer.lr", "1"], "optimizer"),
    (["--data.batch_size", "four"], "data.batch_size"),
    (["--data.batch_size", "2.5"], "integer"),
    (["--run.resume", "maybe"], "boolean"),
    (["--optim", "1"], "section"),
    (["positional"], "unexpected argument"),
])
def test_bad_command_line_is_rejected_with_the_key(argv, needle):
    with pytest.raises(UserFacingError, match=needle):
        load_config(argv, DEFAULTS)


def test_unknown_key_in_preset_names_the_file_and_key(tmp_path):
    preset = write(tmp_path, {"optim": {"learning_rate": 1.0}})
    with pytest.raises(UserFacingError) as err:
        load_config(["--config", preset], DEFAULTS)
    assert "optim.learning_rate" in str(err.value) and "preset.yaml" in str(err.value)
    assert "optim.lr" in str(err.value)  # lists the valid keys


def test_missing_or_broken_preset(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.yaml")], DEFAULTS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(UserFacingError, match="not valid YAML"):
        load_config(["--config", str(bad)], DEFAULTS)


def test_free_form_section_accepts_any_key(tmp_path):
    preset = write(tmp_path, {"model": {"kwargs": {"positions": "index", "encoder_kwargs": {"n_layers": 2}}}})
    cfg = load_config(["--config", preset, "--model.kwargs.dropout", "0.0",
                       "--model.kwargs.encoder_kwargs", "{widths: [16, 64]}"], DEFAULTS)
    assert cfg["model"]["kwargs"] == {"positions": "index", "dropout": 0.0, "encoder_kwargs": {"widths": [16, 64]}}


def test_flatten_gives_dotted_keys():
    flat = flatten(load_config([], DEFAULTS))
    assert flat["optim.lr"] == 1e-4 and flat["model.kwargs"] == {} and flat["data.folds"] == []
    assert "optim" not in flat
