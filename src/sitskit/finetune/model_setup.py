"""Building the fine-tuned model: registry name + kwargs, pre-trained encoder weights, frozen parts, lr groups."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from sitskit.errors import UserFacingError


def resolve_pretrained(source: str, cache_root: Path) -> Path:
    """A local export folder / checkpoint file as given; `runs:/<id>/encoder` downloaded from MLflow."""
    if source.startswith("runs:/"):
        from sitskit import tracking

        return tracking.download_run_artifact(source, cache_root)
    path = Path(source)
    if not path.exists():
        raise UserFacingError(f"model.pretrained: {path} does not exist (give pretrain.py's "
                              "checkpoints/<run>/encoder, a runs:/<id>/encoder URI or a released STCLN checkpoint)")
    return path


def weights_digest(path: Path) -> str:
    """sha256 of the weights file of an export folder (or of a checkpoint file): the lineage of a fine-tune."""
    target = path / "model.safetensors" if path.is_dir() else path
    h = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_finetune_model(model_cfg: dict, in_channels: int, num_classes: int, pretrained: Path | None) -> nn.Module:
    from sitskit.models import build

    kwargs = dict(model_cfg["kwargs"])
    if pretrained is not None and pretrained.is_dir():
        # the encoder's architecture comes from its export; the head's options stay the user's
        from sitskit.models.registry import read_pretrained_config

        meta = read_pretrained_config(pretrained)
        enc = dict(meta["config"])
        bands = enc.pop("in_channels", in_channels)
        if bands != in_channels:
            raise UserFacingError(f"model.pretrained {pretrained}: the encoder takes {bands} bands, the data file has "
                                  f"{in_channels}")
        if meta["name"] == "stcln_encoder" and model_cfg["name"] in ("stcln", "stcln_paps"):
            for key in ("positions", "dropout"):
                if key in enc:
                    kwargs.setdefault(key, enc.pop(key))
            kwargs.setdefault("encoder_kwargs", enc)
    try:
        model = build(model_cfg["name"], in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, UserFacingError):
            raise
        raise UserFacingError(f"model: cannot build {model_cfg['name']!r} with {kwargs}: {exc}") from None
    if pretrained is not None:
        if not hasattr(model, "encoder"):
            raise UserFacingError(f"model.pretrained: model {model_cfg['name']!r} has no `encoder` to load "
                                  "pre-trained weights into (use stcln or stcln_paps)")
        from sitskit.models.checkpoints import load_pretrained_encoder

        load_pretrained_encoder(model, pretrained)
    if model_cfg["freeze_encoder"]:
        if not hasattr(model, "encoder"):
            raise UserFacingError(f"model.freeze_encoder: model {model_cfg['name']!r} has no `encoder`")
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return model


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, encoder_lr: float | None) -> list[dict]:
    """AdamW groups: (encoder | rest) x (decay | no decay: biases, norms, 1-D tokens). The rest comes last,
    so `param_groups[-1]["lr"]` is optim.lr. timm's schedulers scale each group from its own initial lr."""
    encoder_ids = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((id(p) in encoder_ids, no_decay), []).append(p)
    out = []
    for (is_enc, no_decay) in sorted(groups, key=lambda k: (not k[0], k[1])):
        out.append({"params": groups[(is_enc, no_decay)], "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr": (encoder_lr or lr) if is_enc else lr})
    if not out:
        raise UserFacingError("model: nothing to train (every parameter is frozen)")
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def class_weights(spec, class_pixels: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor | None:
    """spec: None | "inverse_frequency" | "inverse_sqrt" | list of K weights; class_pixels: [K] training counts.
    Ignored classes get 0; the weights of the others average to 1."""
    if spec is None:
        return None
    k = len(class_pixels)
    if isinstance(spec, list):
        if len(spec) != k:
            raise UserFacingError(f"loss.class_weights: {len(spec)} weights for {k} classes")
        w = torch.tensor(spec, dtype=torch.float32)
    else:
        freq = class_pixels.float() / class_pixels.sum().clamp_min(1)
        w = 1.0 / freq.clamp_min(1e-6)
        if spec == "inverse_sqrt":
            w = w.sqrt()
        w[class_pixels == 0] = 0.0
    w[ignore] = 0.0
    positive = w[w > 0]
    return w / positive.mean() if len(positive) else w
