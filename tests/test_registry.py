"""Model registry: build by name, config, save_pretrained / from_pretrained and their error messages."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sitskit.errors import UserFacingError
from sitskit.models import (
    build,
    from_pretrained,
    list_models,
    read_pretrained_config,
    register_model,
    save_pretrained,
)


@register_model("_test_tiny")
class Tiny(nn.Module):
    def __init__(self, width: int = 3, scale: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(width, 2)
        self.norm = nn.BatchNorm1d(2)
        self.scale = scale

    def forward(self, x):
        return self.norm(self.linear(x)) * self.scale


def test_list_models_contains_the_project_models():
    assert {"stcln_encoder", "stcln_pretrain", "stcln", "utae", "ltae"} <= set(list_models())


def test_build_sets_config_from_kwargs():
    model = build("_test_tiny", width=4)
    assert model.config == {"name": "_test_tiny", "width": 4}
    assert model.linear.in_features == 4


def test_nested_encoder_is_built_through_the_registry():
    model = build("stcln_pretrain", in_channels=13, positions="index")
    assert model.encoder.config == {"name": "stcln_encoder", "in_channels": 13, "positions": "index", "dropout": 0.1}


def test_unknown_model_and_options_are_user_errors():
    with pytest.raises(UserFacingError, match="unknown model 'nope'.*stcln"):
        build("nope")
    with pytest.raises(UserFacingError, match="unknown option.*widht.*valid options: width, scale"):
        build("_test_tiny", widht=3)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("_test_tiny")(lambda: nn.Identity())


def test_round_trip_keeps_buffers_and_extra(tmp_path):
    torch.manual_seed(0)
    model = build("_test_tiny", width=3, scale=2.0)
    model.train()
    model(torch.randn(8, 3))  # move the BatchNorm running statistics away from their defaults
    out = save_pretrained(model, tmp_path / "export", extra={"mlflow_run_id": "r1", "epoch": 3})
    meta = json.loads((out / "config.json").read_text())
    assert meta["name"] == "_test_tiny" and meta["config"] == {"width": 3, "scale": 2.0}
    assert meta["mlflow_run_id"] == "r1" and meta["epoch"] == 3
    assert read_pretrained_config(out)["mlflow_run_id"] == "r1"
    loaded = from_pretrained(out)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not list(out.glob("*.tmp"))


def test_save_pretrained_refuses_reserved_extra_and_unbuilt_models(tmp_path):
    with pytest.raises(UserFacingError, match="reserved"):
        save_pretrained(build("_test_tiny"), tmp_path / "a", extra={"name": "x"})
    with pytest.raises(UserFacingError, match="no `config`"):
        save_pretrained(nn.Linear(2, 2), tmp_path / "b")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(UserFacingError, match="config.json: not found"):
        from_pretrained(tmp_path)
    save_pretrained(build("_test_tiny", width=3), tmp_path / "m")
    # weights exported for width=3 do not fit a width=5 model: one message listing the mismatch
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["width"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserFacingError, match="model.safetensors.*shape mismatch.*linear.weight"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(UserFacingError, match="config.json: invalid JSON"):
        from_pretrained(tmp_path / "m")
    save_pretrained(build("_test_tiny"), tmp_path / "n")
    (tmp_path / "n" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserFacingError, match="model.safetensors: cannot read"):
        from_pretrained(tmp_path / "n")
