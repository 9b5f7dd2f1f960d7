"""Demo: load pre-trained Models Genesis weights into the README's segmentation snippet.

Builds the fine-tuning model exactly as the README's segmentation snippet does (the U-Net,
`load_weights`, `depth_13_relu`, a 1x1x1 `Conv3D(num_class)`, `Softmax(axis=1)`), checks that
the loaded weights are the file's (read back with h5py, independently of Keras), and fine-tunes
it for a few steps on a toy task made from the demo cubes (label: voxels denser than water).

    python datasets/demo_finetune.py --weights demo_output/weights/Vnet-genesis_chest_ct.h5 \\
        --cubes demo_output/generated_cubes/bat_32_s_64x64x32_1.npy --n_base_filters 4
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "keras"))

import numpy as np

from unet3d import *


def h5_kernel(path: str, layer: str):
    """The kernel of `layer` read straight from a Keras .h5 model file with h5py."""
    import h5py

    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and "kernel" in name.split("/")[-1]:
            found.append(obj[()])

    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)
        root[layer].visititems(visit)
    if len(found) != 1:
        raise ValueError(f"Expected one kernel for layer {layer} in {path}. Received: {len(found)}")
    return found[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="pre-trained .h5 (Genesis_Chest_CT.py)")
    parser.add_argument("--cubes", required=True, help="a .npy of cubes (N, 64, 64, 32)")
    parser.add_argument(
        "--n_base_filters",
        type=int,
        default=32,
        help="width the weights were trained with (default: 32)",
    )
    parser.add_argument("--steps", type=int, default=2, help="fine-tuning steps (default: 2)")
    args = parser.parse_args(argv)

    # ---- the README's segmentation snippet (with the demo's weights and network width) ----
    input_rows, input_cols, input_deps = 64, 64, 32  # any sizes divisible by 8
    num_class = 2
    weight_dir = args.weights

    models_genesis = unet_model_3d(
        (1, input_rows, input_cols, input_deps),
        batch_normalization=True,
        n_base_filters=args.n_base_filters,
    )
    print(f"Load pre-trained Models Genesis weights from {weight_dir}")
    models_genesis.load_weights(weight_dir)

    x = models_genesis.get_layer("depth_13_relu").output
    x = Conv3D(num_class, 1)(x)
    output = Softmax(axis=1)(x)  # classes on axis 1: channels-first
    model = keras.models.Model(inputs=models_genesis.input, outputs=output)
    model.compile(
        optimizer="rmsprop",
        loss=dice_coef_loss,
        metrics=[mean_iou, dice_coef],
    )
    # ----------------------------------------------------------------------------

    loaded = np.asarray(model.get_layer("depth_0_conv").kernel)
    np.testing.assert_array_equal(loaded, h5_kernel(args.weights, "depth_0_conv"))
    print(
        f"Loaded {args.weights} into the segmentation model: depth_0_conv kernel "
        f"{loaded.shape} equals the file's; {model.count_params()} parameters."
    )

    cubes = np.load(args.cubes, mmap_mode="r")
    n = min(len(cubes), 2 * args.steps)
    images = np.asarray(cubes[:n], dtype=np.float32)[:, None]  # (n, 1, R, C, D)
    dense = (images > 0.5).astype(np.float32)  # above 0 HU
    labels = np.concatenate([1 - dense, dense], axis=1)  # one-hot, channels first
    history = model.fit(images, labels, batch_size=2, epochs=1, verbose=2)
    print(
        f"Fine-tuned {n} cubes for one epoch: dice_coef "
        f"{history.history['dice_coef'][-1]:.3f}, mean_iou "
        f"{history.history['mean_iou'][-1]:.3f}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
