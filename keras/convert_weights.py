"""Convert Models Genesis weights between the PyTorch release (``.pt``) and Keras, exactly.

The authors publish the network twice: ``Genesis_Chest_CT.h5`` for Keras and
``Genesis_Chest_CT.pt`` for PyTorch. The ``.pt`` holds a different decoder (transposed
convolutions) and a batch norm that always uses batch statistics; in Keras that network is
``unet3d.unet_model_3d(..., variant="pytorch")``. This module maps its weights both ways:

* ``.pt`` -> ``.keras`` (a whole model: ``keras.models.load_model`` reads it after
  ``import unet3d``), ``.weights.h5`` or ``.h5``;
* a model of the pytorch variant (``.keras``, ``.weights.h5`` or ``.h5``) -> ``.pt`` in the
  published format: ``torch.save({"epoch", "state_dict", "optimizer_state_dict"})`` with every
  key prefixed ``module.``, as saved from ``nn.DataParallel``, loadable with ``strict=True``
  into the PyTorch network.

Weights are copied bit for bit; convolution kernels only change axis order (no flip), from
PyTorch's ``(out, in, k, k, k)`` (``(in, out, k, k, k)`` for transposed convolutions) to Keras'
``(k, k, k, in, out)`` (``(k, k, k, out, in)``). PyTorch is needed only here, and imported only
when a ``.pt`` is read or written; Keras only when a model is built.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

# Sibling modules are imported from this script's own folder, so it works from anywhere.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from genesis_files import DATA_FORMATS, MODEL_DATA_FORMAT, atomic_path

__all__ = [
    "TORCH_INSTALL_HINT",
    "KERAS_SUFFIXES",
    "import_torch",
    "torch_entries",
    "expected_torch_shapes",
    "read_torch_checkpoint",
    "check_torch_state",
    "keras_model_from_torch",
    "torch_state_from_keras",
    "save_torch_checkpoint",
    "convert",
    "main",
]

TORCH_INSTALL_HINT = (
    "PyTorch is needed to read or write .pt files and is not installed: "
    "pip install torch (CPU only: pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu)"
)
KERAS_SUFFIXES = (".keras", ".weights.h5", ".h5")

# The PyTorch release's module names. Its names count channels of the 32-filter network
# (down_tr64 ends with 64 channels); they stay the same whatever the width.
_DOWN = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
_UP = ("up_tr256", "up_tr128", "up_tr64")
_BN = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
    ("num_batches_tracked", "num_batches_tracked"),
)
_COUNTER = "num_batches_tracked"
_INT32_MAX = 2**31 - 1


def import_torch():
    """``import torch``, or an ImportError whose message is the one-line install hint.

    Returns:
        The torch module.
    """
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_INSTALL_HINT) from None
    return torch


def torch_entries(
    in_channels: int = 1, n_base_filters: int = 32, n_labels: int = 1
) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Every tensor of the PyTorch network's state dict, in its order, with its Keras place.

    Args:
        in_channels: input channels.
        n_base_filters: channels of the first block (32 in the release).
        n_labels: output channels.

    Returns:
        ``(key, shape, keras_layer, keras_weight)`` tuples, keys without ``module.``; for
        example ``("down_tr64.ops.0.conv1.weight", (32, 1, 3, 3, 3), "depth_0_conv",
        "kernel")``.
    """
    entries = []
    block = 0

    def conv_block(prefix: str, cin: int, cout: int) -> None:
        nonlocal block
        conv = f"depth_{block}_conv"
        entries.append((f"{prefix}.conv1.weight", (cout, cin, 3, 3, 3), conv, "kernel"))
        entries.append((f"{prefix}.conv1.bias", (cout,), conv, "bias"))
        for torch_name, keras_name in _BN:
            shape = () if torch_name == _COUNTER else (cout,)
            entries.append((f"{prefix}.bn1.{torch_name}", shape, f"depth_{block}_bn", keras_name))
        block += 1

    n = n_base_filters
    cin = in_channels
    for d, name in enumerate(_DOWN):
        conv_block(f"{name}.ops.0", cin, n * 2**d)
        conv_block(f"{name}.ops.1", n * 2**d, n * 2 ** (d + 1))
        cin = n * 2 ** (d + 1)
    for d, name in zip((2, 1, 0), _UP, strict=True):
        skip = n * 2 ** (d + 1)
        up = f"level_{d}_up"
        entries.append((f"{name}.up_conv.weight", (cin, cin, 2, 2, 2), up, "kernel"))
        entries.append((f"{name}.up_conv.bias", (cin,), up, "bias"))
        conv_block(f"{name}.ops.0", cin + skip, skip)
        conv_block(f"{name}.ops.1", skip, skip)
        cin = skip
    entries.append(("out_tr.final_conv.weight", (n_labels, cin, 1, 1, 1), "output_conv", "kernel"))
    entries.append(("out_tr.final_conv.bias", (n_labels,), "output_conv", "bias"))
    return entries


def expected_torch_shapes(
    in_channels: int = 1, n_base_filters: int = 32, n_labels: int = 1
) -> dict[str, tuple[int, ...]]:
    """The PyTorch network's state-dict keys (no ``module.``) and shapes, in order.

    Args:
        in_channels: input channels.
        n_base_filters: channels of the first block.
        n_labels: output channels.

    Returns:
        An ordered ``{key: shape}``.
    """
    return {key: shape for key, shape, _, _ in torch_entries(in_channels, n_base_filters, n_labels)}


def _kernel_to_keras(w: np.ndarray) -> np.ndarray:
    # (out, in, k, k, k) -> (k, k, k, in, out); a transposed conv's (in, out, k..) -> (k.., out, in)
    return np.ascontiguousarray(np.transpose(w, (2, 3, 4, 1, 0)))


def _kernel_to_torch(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (4, 3, 0, 1, 2)))


# --------------------------------------------------------------------------------------------
# Reading and checking a .pt
# --------------------------------------------------------------------------------------------


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a ``.pt`` file as NumPy arrays, keys without ``module.``.

    Accepts the published training dict (``{"epoch", "state_dict", "optimizer_state_dict"}``)
    and a bare state dict, with or without the ``module.`` prefix of ``nn.DataParallel``. The
    file is read with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Args:
        path: the ``.pt`` file.

    Returns:
        ``{key: array}`` in the file's order.

    Raises:
        ImportError: PyTorch is not installed (the message says how to install it).
        FileNotFoundError: no such file.
        ValueError: the file is not a PyTorch checkpoint or holds no state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected an existing .pt file. Received: path={path!r}")
    torch = import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not a checkpoint we can read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            "Expected a PyTorch checkpoint (torch.save of a dict holding 'state_dict', or of a "
            f"state dict). Received: path={path!r}, which torch.load cannot read: {first}"
        ) from None
    state = obj.get("state_dict") if isinstance(obj, dict) and "state_dict" in obj else obj
    if not isinstance(state, dict) or not state:
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            "Expected a PyTorch checkpoint holding a state dict ({'state_dict': {...}} as "
            f"published, or the state dict itself). Received: path={path!r} holding {found}"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"Expected a state dict of tensors in {path!r}. Received: key {key!r} holds a "
                f"{type(value).__name__}"
            )
        name = str(key)[len("module.") :] if str(key).startswith("module.") else str(key)
        arrays[name] = value.detach().cpu().numpy()
    return arrays


def check_torch_state(
    state: dict[str, np.ndarray],
    source: str = "the state dict",
    expected: tuple[int, int, int] | None = None,
) -> tuple[int, int, int]:
    """Check a state dict against the PyTorch release's network, key by key.

    The widths are read from the first and last convolutions, so narrower networks of the
    same design pass; ``num_batches_tracked`` may be absent (files of old PyTorch versions).

    Args:
        state: ``{key: array}``, keys without ``module.``.
        source: what to call it in errors (the file name).
        expected: ``(in_channels, n_base_filters, n_labels)`` the network must have, or None.

    Returns:
        ``(in_channels, n_base_filters, n_labels)``.

    Raises:
        ValueError: naming the first missing or unexpected key, or the first shape that differs.
    """
    first, last = "down_tr64.ops.0.conv1.weight", "out_tr.final_conv.weight"
    for key in (first, last):
        if key not in state or np.ndim(state[key]) != 5:
            raise ValueError(
                f"Expected the Models Genesis PyTorch network in {source}: a 5-d {key!r}. "
                f"Received: {'no such key' if key not in state else np.shape(state[key])}; "
                f"first keys {list(state)[:4]}"
            )
    sizes = (int(state[first].shape[1]), int(state[first].shape[0]), int(state[last].shape[0]))
    if expected is not None and sizes != tuple(expected):
        raise ValueError(
            f"Expected (in_channels, n_base_filters, n_labels)={tuple(expected)} in {source}. "
            f"Received: {sizes}, from {first!r} {state[first].shape} and {last!r} "
            f"{state[last].shape}"
        )
    shapes = expected_torch_shapes(*sizes)
    for key, shape in shapes.items():
        if key not in state:
            if key.endswith(_COUNTER):
                continue
            raise ValueError(
                f"Expected key {key!r} with shape {shape} in {source}. Received: no such key "
                f"(the file has {len(state)} tensors, the network {len(shapes)})"
            )
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"Expected {key!r} with shape {shape} in {source}. "
                f"Received: shape {tuple(state[key].shape)}"
            )
    extra = [key for key in state if key not in shapes]
    if extra:
        raise ValueError(
            f"Expected only the Models Genesis network's keys in {source}. Received: unexpected "
            f"key {extra[0]!r} with shape {tuple(np.shape(state[extra[0]]))} "
            f"({len(extra)} unexpected in all)"
        )
    return sizes


# --------------------------------------------------------------------------------------------
# Both directions
# --------------------------------------------------------------------------------------------


def keras_model_from_torch(
    state: dict[str, np.ndarray],
    data_format: str | None = None,
    batch_statistics: bool = True,
    source: str = "the state dict",
) -> Any:
    """A ``unet_model_3d(..., variant="pytorch")`` holding a PyTorch state dict's weights.

    Args:
        state: from :func:`read_torch_checkpoint`.
        data_format: of the Keras model; None means channels_first.
        batch_statistics: batch norm at inference with batch statistics (the release's
            behaviour) or with the moving ones.
        source: what to call the state dict in errors.

    Returns:
        A ``unet3d.UNet3D`` with spatial input sizes left open (any multiple of 8).

    Raises:
        ValueError: the state dict is not of that network.
    """
    import unet3d

    in_channels, n, n_labels = check_torch_state(state, source)
    data_format = MODEL_DATA_FORMAT if data_format is None else data_format
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"Expected data_format in {DATA_FORMATS}. Received: data_format={data_format!r}"
        )
    shape = (
        (in_channels, None, None, None)
        if data_format == "channels_first"
        else (None, None, None, in_channels)
    )
    model = unet3d.unet_model_3d(
        shape,
        n_base_filters=n,
        n_labels=n_labels,
        variant="pytorch",
        batch_statistics=batch_statistics,
        data_format=data_format,
    )
    for key, _, layer_name, weight_name in torch_entries(in_channels, n, n_labels):
        if key not in state:  # an absent batch counter stays 0
            continue
        variable = _keras_variable(model, layer_name, weight_name)
        value = state[key]
        if weight_name == "kernel":
            value = _kernel_to_keras(value)
        elif weight_name == _COUNTER:
            if not 0 <= int(value) <= _INT32_MAX:
                raise ValueError(
                    f"Expected {key!r} in [0, {_INT32_MAX}] in {source}. Received: {int(value)}"
                )
            value = np.asarray(value, dtype="int32")
        else:
            value = np.asarray(value, dtype="float32")
        variable.assign(value)
    return model


def _keras_variable(model: Any, layer_name: str, weight_name: str) -> Any:
    layer = model.get_layer(layer_name)
    for variable in layer.weights:
        if variable.name == weight_name:
            return variable
    raise ValueError(
        f"Expected layer '{layer_name}' of model '{model.name}' to have a weight "
        f"'{weight_name}' (a model of unet_model_3d(..., variant='pytorch')). "
        f"Received: weights {[v.name for v in layer.weights]}"
    )


def _check_pytorch_variant(model: Any, source: str) -> tuple[int, int, int]:
    """``(in_channels, n_base_filters, n_labels)`` of a pytorch-variant model, or a clear error."""
    import unet3d

    names = {layer.name for layer in model.layers}
    problem = None
    if "depth_0_conv" not in names or "output_conv" not in names:
        problem = "no layers 'depth_0_conv' and 'output_conv'"
    elif "depth_13_conv" not in names or "depth_14_conv" in names:
        problem = "not depth 4 (blocks depth_0 .. depth_13)"
    else:
        for layer in model.layers:
            if layer.name.endswith("_bn") and not isinstance(layer, unet3d.TorchBatchNormalization):
                problem = f"layer '{layer.name}' is a {type(layer).__name__}"
            elif layer.name.endswith("_up") and not isinstance(layer, unet3d.Conv3DTranspose):
                problem = f"layer '{layer.name}' is a {type(layer).__name__}, not Conv3DTranspose"
            if problem:
                break
        if problem is None and "depth_0_bn" not in names:
            problem = "no batch norm"
    if problem:
        raise ValueError(
            "Expected a model of unet_model_3d(..., variant='pytorch') (transposed-convolution "
            f"decoder, TorchBatchNormalization, depth 4). Received: {source}: {problem}"
        )
    kernel = model.get_layer("depth_0_conv").kernel
    out = model.get_layer("output_conv").kernel
    return int(kernel.shape[3]), int(kernel.shape[4]), int(out.shape[4])


def torch_state_from_keras(model: Any, source: str = "the model") -> OrderedDict:
    """The PyTorch network's state dict (NumPy arrays, no ``module.``) of a pytorch-variant model.

    Args:
        model: a ``unet_model_3d(..., variant="pytorch")`` network.
        source: what to call the model in errors.

    Returns:
        An ``OrderedDict`` in the PyTorch network's order; ``num_batches_tracked`` as int64.

    Raises:
        ValueError: the model is not of the pytorch variant.
    """
    sizes = _check_pytorch_variant(model, source)
    state = OrderedDict()
    for key, shape, layer_name, weight_name in torch_entries(*sizes):
        value = np.asarray(_keras_variable(model, layer_name, weight_name).numpy())
        if weight_name == "kernel":
            value = _kernel_to_torch(value)
        elif weight_name == _COUNTER:
            value = value.astype(np.int64)
        if value.shape != shape:
            raise ValueError(
                f"Expected layer '{layer_name}' weight '{weight_name}' to give {key!r} of shape "
                f"{shape}. Received: {value.shape} ({source})"
            )
        state[key] = value
    return state


def save_torch_checkpoint(
    state: dict[str, np.ndarray], path: str | os.PathLike, epoch: int = 0
) -> None:
    """Write a state dict as the release did, atomically.

    ``torch.save({"epoch": epoch, "state_dict": {"module." + key: tensor},
    "optimizer_state_dict": {}})``: the optimizer's state does not carry over from Keras, so it
    is empty.

    Args:
        state: ``{key: array}`` without ``module.``, from :func:`torch_state_from_keras`.
        path: the ``.pt`` to write.
        epoch: the value stored under ``"epoch"``.
    """
    torch = import_torch()
    tensors = OrderedDict(
        # np.array, not np.ascontiguousarray: that makes a 0-d counter 1-d.
        ("module." + key, torch.from_numpy(np.array(value, order="C")))
        for key, value in state.items()
    )
    checkpoint = {"epoch": int(epoch), "state_dict": tensors, "optimizer_state_dict": {}}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def _load_keras(path: str) -> Any:
    """A pytorch-variant model from a ``.keras`` (whole model) or a weights file."""
    import keras

    import unet3d

    if path.endswith(".keras") and zipfile.is_zipfile(path):
        return keras.models.load_model(path, compile=False)
    sizes = _keras_file_sizes(path)
    model = unet3d.unet_model_3d(
        (sizes[0], None, None, None), n_base_filters=sizes[1], n_labels=sizes[2], variant="pytorch"
    )
    try:
        model.load_weights(path)
    except ValueError as exc:
        raise ValueError(
            f"Expected weights of unet_model_3d(..., variant='pytorch') in {path!r}. "
            f"Received: {exc}"
        ) from None
    return model


def _keras_file_sizes(path: str) -> tuple[int, int, int]:
    """``(in_channels, n_base_filters, n_labels)`` from a Keras weights file's first and last
    convolutions."""
    import h5py

    import unet3d

    if path.endswith(".weights.h5"):
        layers = dict(unet3d._keras3_file_layers(path))
    else:
        with h5py.File(path, "r") as f:
            layers = dict(unet3d._file_layers(unet3d._legacy_h5_root(f, path)))
    if "depth_0_conv" not in layers or "output_conv" not in layers:
        raise ValueError(
            "Expected a Keras file of unet_model_3d with layers 'depth_0_conv' and "
            f"'output_conv'. Received: {path!r} with layers {sorted(layers)[:6]}"
        )
    first = layers["depth_0_conv"][0][1]
    last = layers["output_conv"][0][1]
    return int(first[3]), int(first[4]), int(last[4])


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    data_format: str | None = None,
    batch_statistics: bool = True,
    epoch: int = 0,
) -> str:
    """Convert ``src`` to ``dst``, the direction chosen by their suffixes.

    Args:
        src: a ``.pt``, or a ``.keras`` / ``.weights.h5`` / ``.h5`` of the pytorch variant.
        dst: a ``.keras``, ``.weights.h5`` or ``.h5`` for a ``.pt`` source; a ``.pt`` otherwise.
        data_format: of the Keras model written from a ``.pt`` (None: channels_first).
        batch_statistics: of the Keras model written from a ``.pt``.
        epoch: stored in a ``.pt`` written.

    Returns:
        A one-line summary of what was written.

    Raises:
        ValueError: unsupported suffixes or a file of another network; nothing is written.
        FileNotFoundError: no ``src``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Expected an existing SRC file. Received: src={src!r}")
    if src.endswith(".pt") and dst.endswith(KERAS_SUFFIXES):
        state = read_torch_checkpoint(src)
        model = keras_model_from_torch(state, data_format, batch_statistics, source=repr(src))
        if dst.endswith(".weights.h5"):
            model.save_weights(dst)
        else:
            model.save(dst)  # UNet3D.save writes a temporary file and renames it
        return f"Wrote {dst}: {len(state)} tensors of {src} ({model.count_params():,} parameters)"
    if src.endswith(KERAS_SUFFIXES) and dst.endswith(".pt"):
        import_torch()  # before the slow Keras import, so a missing PyTorch answers at once
        state = torch_state_from_keras(_load_keras(src), source=repr(src))
        save_torch_checkpoint(state, dst, epoch=epoch)
        return f"Wrote {dst}: {len(state)} tensors of {src}"
    raise ValueError(
        "Expected SRC .pt and DST .keras, .weights.h5 or .h5, or SRC .keras, .weights.h5 or .h5 "
        f"and DST .pt. Received: src={src!r}, dst={dst!r}"
    )


EXAMPLE = """\
examples:
  # the published PyTorch weights as a whole Keras model (then: keras.models.load_model)
  python keras/convert_weights.py pretrained_weights/Genesis_Chest_CT.pt \\
      pretrained_weights/Genesis_Chest_CT_torch.keras
  # weights only, for unet_model_3d(..., variant="pytorch", data_format="channels_last")
  python keras/convert_weights.py Genesis_Chest_CT.pt genesis_torch.weights.h5
  # back to PyTorch: a .pt in the published format (keys 'module.*')
  python keras/convert_weights.py my_finetuned.keras my_finetuned.pt
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert Models Genesis weights between the PyTorch release (.pt) and Keras "
        "(unet_model_3d(..., variant='pytorch')), exactly. Needs PyTorch.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="a .pt, or a .keras / .weights.h5 / .h5 of the variant")
    parser.add_argument("dst", help="a .keras / .weights.h5 / .h5 for a .pt SRC; a .pt otherwise")
    parser.add_argument(
        "--data_format",
        choices=DATA_FORMATS,
        default=MODEL_DATA_FORMAT,
        help="layout of the Keras model written from a .pt (default: %(default)s)",
    )
    parser.add_argument(
        "--no_batch_statistics",
        action="store_true",
        help="Keras model written from a .pt: batch norm uses the moving statistics at "
        "inference (the release always uses the batch's own)",
    )
    parser.add_argument(
        "--epoch", type=int, default=0, help="'epoch' stored in a .pt written (default: 0)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (reported as one line).
    """
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isfile(args.src):
            raise FileNotFoundError(f"Expected an existing SRC file. Received: src={args.src!r}")
        import_torch()
        print(
            convert(
                args.src,
                args.dst,
                data_format=args.data_format,
                batch_statistics=not args.no_batch_statistics,
                epoch=args.epoch,
            )
        )
    except (ImportError, FileNotFoundError, ValueError) as exc:
        print(f"convert_weights.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
