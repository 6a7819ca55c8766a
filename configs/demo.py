"""The embedded default: runs end to end on a laptop CPU.

Run:
  python -m transvw_jax.main --config configs/demo.py --workdir runs/demo
A tiny variant (width 4) for smoke tests:
  python -m transvw_jax.main --config configs/demo.py:runlocal --workdir runs/tiny
Override any value on the command line, e.g. --config.model.width=16.

Stages available today: export (writes <workdir>/export/transvw.{pt,safetensors} from
the latest checkpoint in <workdir>, or from a fresh initialisation with a warning).
"""

import ml_collections

from transvw_jax import transforms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = ("export",)

    config.model = ml_collections.ConfigDict()
    config.model.name = "ynet3d"  # unet3d (Models Genesis) | ynet3d (TransVW) | encoder_classifier
    config.model.width = 32  # 32 is the reference network
    config.model.num_classes = 44  # visual-word classes (ignored by unet3d)
    config.model.bn = "reference"  # reference: batch statistics also at eval | standard
    config.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    config.model.conv_impl = "xla3d"  # or depth2d: faster CPU forward, slower CPU training

    config.data = ml_collections.ConfigDict()
    config.data.cube_shape = (64, 64, 32)  # X, Y, Z; each divisible by 8

    # Restoration transforms (used by pretraining): one sub-dict per transform; the
    # Models Genesis settings are transforms.default_config("genesis").
    config.transforms = transforms.default_config("transvw")

    config.export = ml_collections.ConfigDict()
    config.export.formats = ("pt", "safetensors")  # pt needs the torch extra
    config.export.head = True  # include the visual-word head (clc_out.*)

    if arg == "runlocal":
        config.model.width = 4
        config.model.num_classes = 8
        config.data.cube_shape = (16, 16, 8)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: runlocal")
    return config
