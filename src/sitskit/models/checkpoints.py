"""Import the released STCLN encoder checkpoints (`checkpoint_99.sttrans.tar`, `checkpoint_99.utae.tar`).

Those files are bare `UTAE.state_dict()`s of the authors' code: 123 keys, of which only
`inc.*`, `down1.*`, `temporal_encoder.in_norm.*` and `temporal_encoder.layer_stack.*` are used by the
forward pass. The rest are built-but-dead modules (`up3`, `temporal_encoder.{inconv,mlp,out_norm,
transformer_encoder}`) and are dropped. Anything else is an error, as is a used key that is missing.

Key names: `inc.double_conv.{0,1,3,4}` and `down1.maxpool_conv.0.double_conv.{0,1,3,4}` are the names
of the UNet-style DoubleConv/Down blocks in the authors' STCLN.py; `down1.maxpool_conv.0.` is mapped to
our `down1.` (the max-pool it was named after is commented out). `layer_stack.{i}.*` use torch's
TransformerEncoderLayer names (self_attn.in_proj_*, out_proj, linear1/2, norm1/2) — inferred from the
key count (12 per layer) and the authors' layer class, which copies torch's attribute names.

    encoder = import_reference_encoder("checkpoint_99.sttrans.tar")   # positions="index" as trained
    load_pretrained_encoder(classifier, "checkpoints/run/encoder")   # or a reference checkpoint file
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from sitskit.errors import UserFacingError
from sitskit.models.registry import CONFIG_NAME, build, from_pretrained, load_state_dict_checked

USED_PREFIXES = ("inc.", "down1.", "temporal_encoder.in_norm.", "temporal_encoder.layer_stack.")
DEAD_PREFIXES = ("up3.", "temporal_encoder.inconv.", "temporal_encoder.mlp.", "temporal_encoder.out_norm.",
                 "temporal_encoder.transformer_encoder.")
RENAMES = {"down1.maxpool_conv.0.": "down1."}
# heads of the authors' pre-training wrapper (UTAEPrediction), present in full training checkpoints
PRETRAIN_HEAD_KEYS = ("linear.weight", "linear.bias", "midlinear.weight", "midlinear.bias", "MASK_TOKEN")


def read_reference_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a reference checkpoint safely (`weights_only=True`) and return the encoder's bare state dict.

    Accepts the released bare state dicts, `DataParallel` (`module.`) prefixes and the full training
    checkpoints `{'model_state_dict': UTAEPrediction state, ...}` (encoder keys under `utae.`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UserFacingError(f"{path}: not a loadable torch checkpoint ({str(exc).splitlines()[0]})") from exc
    if isinstance(obj, dict):
        for wrapper in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserFacingError(f"{path}: expected a state dict (name -> tensor)")
    state = _strip_prefix(obj, "module.")
    if any(k.startswith("utae.") for k in state):
        others = sorted(k for k in state if not k.startswith("utae.") and k not in PRETRAIN_HEAD_KEYS)
        if others:
            raise UserFacingError(f"{path}: unexpected keys outside the encoder: {others[:5]}")
        state = {k[len("utae."):]: v for k, v in state.items() if k.startswith("utae.")}
    return state


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def convert_reference_encoder_state(state: dict[str, torch.Tensor], source: str = "checkpoint"
                                    ) -> dict[str, torch.Tensor]:
    """Reference encoder keys -> STCLNEncoder keys: rename, drop the dead modules, refuse unknown keys."""
    converted, unknown = {}, []
    for key, value in state.items():
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        if key.startswith(USED_PREFIXES):
            converted[key] = value
        elif not key.startswith(DEAD_PREFIXES):
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise UserFacingError(f"{source}: {len(unknown)} unknown key(s) for an STCLN encoder checkpoint: {shown}")
    return converted


def import_reference_encoder(path: str | os.PathLike, positions: str = "index", **encoder_kwargs) -> nn.Module:
    """Build an `stcln_encoder` holding the weights of a released STCLN checkpoint.

    in_channels is read from the first convolution (10 for PASTIS, 13 for MTLCC). positions defaults
    to "index" because the released weights were trained with date indices 0..T-1.
    """
    state = convert_reference_encoder_state(read_reference_checkpoint(path), source=str(path))
    first = state.get("inc.double_conv.0.weight")
    if first is None or first.dim() != 4:
        raise UserFacingError(f"{path}: missing key inc.double_conv.0.weight (first convolution)")
    encoder = build("stcln_encoder", in_channels=int(first.shape[1]), positions=positions, **encoder_kwargs)
    load_state_dict_checked(encoder, state, source=str(path))
    return encoder


def load_pretrained_encoder(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Copy pre-trained encoder weights into `model.encoder` (an STCLN classifier or pre-training model).

    source: a directory written by `save_pretrained(encoder, dir)` or a reference checkpoint file.
    """
    source = Path(source)
    if source.is_dir() and (source / CONFIG_NAME).is_file():
        encoder = from_pretrained(source)
    else:
        encoder = import_reference_encoder(source, positions=model.encoder.positions)
    load_state_dict_checked(model.encoder, encoder.state_dict(), source=str(source))
    return model
