"""Models: registry (`build`, `from_pretrained`, `save_pretrained`, `list_models`), STCLN, U-TAE/L-TAE.

    from sitskit.models import build
    model = build("stcln", in_channels=10, num_classes=20)
    logits = model(x, dates, pad_mask)          # x [B,T,C,H,W] -> [B,K,H,W]
"""
# importing a model's module registers it (STCLN, U-TAE/L-TAE, PaPs and the model zoo)
from sitskit.models import (  # noqa: F401
    ablations,
    fcn_lstm,
    fpn,
    ltae,
    paps,
    recurrent,
    stcln,
    stenn,
    unet3d,
    utae,
)
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
