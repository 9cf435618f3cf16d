"""Models: registry (`build`, `from_pretrained`, `save_pretrained`, `list_models`), STCLN, U-TAE/L-TAE.

    from sitskit.models import build
    model = build("stcln", in_channels=10, num_classes=20)
    logits = model(x, dates, pad_mask)          # x [B,T,C,H,W] -> [B,K,H,W]
"""
from sitskit.models import ltae, stcln, utae  # noqa: F401  (importing registers the models)
from sitskit.models import ablations, fcn_lstm, fpn, recurrent, stenn, unet3d  # noqa: F401,E402  (model zoo)
from sitskit.models import paps  # noqa: F401  (registers utae_paps, stcln_paps)
from sitskit.models.registry import (
    build,
    from_pretrained,
    list_models,
    load_state_dict_checked,
    read_pretrained_config,
    register_model,
    save_pretrained,
)

__all__ = [
    "build",
    "from_pretrained",
    "list_models",
    "load_state_dict_checked",
    "read_pretrained_config",
    "register_model",
    "save_pretrained",
]
