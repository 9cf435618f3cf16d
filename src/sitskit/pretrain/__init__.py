"""Masked spatio-temporal pre-training (STCLN): `accelerate launch pretrain.py --config configs/<preset>.yaml`.

- `main_pretrain.main(argv) -> int`: set-up (config, data, model, Accelerate, MLflow, checkpoints)
- `engine_pretrain.train_one_epoch`, `masked_mse`: the loop and the loss
- `masking`: `random_masking`, `vegetation_eligibility`, `MaskGenerator` (strategies + STCLN gating)
- `figures.reconstruction_figure`
"""
