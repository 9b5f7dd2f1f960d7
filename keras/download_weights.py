"""Get the published Models Genesis weights from Hugging Face, and resolve ``hf:FILE`` names.

The authors publish their pre-trained weights in the Hugging Face repository
``MrGiovanni/ModelsGenesis``: ``Genesis_Chest_CT.h5`` (Keras), ``Genesis_Chest_CT.pt``
(PyTorch) and ``genesis_nnunet_luna16_006.model`` (nnU-Net). Files are fetched with
``huggingface_hub.hf_hub_download``, so they go to the hub's cache (``HF_HUB_CACHE``, or
``HF_HOME/hub``, by default ``~/.cache/huggingface/hub``), interrupted downloads resume, a
second request is answered from the cache, and ``HF_HUB_OFFLINE=1`` uses the cache only.

From Python, :func:`resolve_weights` turns ``"hf:Genesis_Chest_CT.h5"`` into a local path (and
returns any other path unchanged); the pre-training and fine-tuning commands call it for their
``--weights``. From the command line, ``python keras/download_weights.py`` fetches a file, checks
that it opens as the published network and copies it to ``pretrained_weights/``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from collections.abc import Sequence

# Sibling modules are imported from this script's own folder, so it works from anywhere.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from genesis_files import atomic_path

__all__ = [
    "REPO_ID",
    "FORMATS",
    "PUBLISHED_FILES",
    "HUB_INSTALL_HINT",
    "HF_PREFIX",
    "resolve_weights",
    "fetch",
    "check_published",
    "main",
]

REPO_ID = "MrGiovanni/ModelsGenesis"
# --format -> file name in the repository.
FORMATS = {"h5": "Genesis_Chest_CT.h5", "pt": "Genesis_Chest_CT.pt"}
PUBLISHED_FILES = (*FORMATS.values(), "genesis_nnunet_luna16_006.model")
HF_PREFIX = "hf:"
HUB_INSTALL_HINT = (
    "huggingface_hub is needed to download the published weights and is not installed: "
    "pip install huggingface_hub"
)


def _import_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(HUB_INSTALL_HINT) from None
    return huggingface_hub


def _hub_constants():
    _import_hub()
    from huggingface_hub import constants

    return constants


def fetch(filename: str, repo_id: str = REPO_ID, revision: str | None = None) -> str:
    """Download one file of the repository through the hub's cache (or find it there).

    Args:
        filename: a file of the repository, e.g. ``"Genesis_Chest_CT.h5"``.
        repo_id: the Hugging Face model repository.
        revision: a branch, tag or commit; None means ``main``.

    Returns:
        The file's path in the hub's cache.

    Raises:
        ImportError: huggingface_hub is not installed (the message says how to install it).
        FileNotFoundError: the file is not in the cache and cannot be downloaded now (offline,
            no network), or the repository has no such file; the message says what to do.
    """
    hub = _import_hub()
    from huggingface_hub import errors

    url = f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{filename}"
    try:
        return hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except errors.LocalEntryNotFoundError:
        constants = _hub_constants()
        offline = bool(constants.HF_HUB_OFFLINE)
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        cache = constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"Expected {filename} of {repo_id} in the Hugging Face cache {cache} or a "
            f"connection to download it. Received: not cached, and {why}. To fix: "
            + ("unset HF_HUB_OFFLINE, or " if offline else "")
            + "run `python keras/download_weights.py` on a machine with network and copy its "
            "cache folder here (or point HF_HUB_CACHE / HF_HOME at a shared one), or download "
            f"{url} by hand and pass its path instead."
        ) from None
    except (errors.EntryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise FileNotFoundError(
            f"Expected a file of {repo_id} (published: {', '.join(PUBLISHED_FILES)}). "
            f"Received: filename={filename!r}, revision={revision!r}: {type(exc).__name__}"
        ) from None


def resolve_weights(spec: str) -> str:
    """A local path for a ``--weights`` value: ``hf:FILE`` is fetched, a path is kept.

    Args:
        spec: ``"hf:Genesis_Chest_CT.h5"`` (a file of ``MrGiovanni/ModelsGenesis``, from the
            hub's cache or downloaded, ``HF_HUB_OFFLINE`` honoured) or a plain path.

    Returns:
        The path: the cached file's for ``hf:``, else ``spec`` unchanged.

    Raises:
        ValueError: ``hf:`` without a file name.
        ImportError: ``hf:`` given and huggingface_hub is not installed.
        FileNotFoundError: see :func:`fetch`.
    """
    spec = os.fspath(spec)
    if not spec.startswith(HF_PREFIX):
        return spec
    filename = spec[len(HF_PREFIX) :].strip()
    if not filename:
        raise ValueError(
            f"Expected hf:FILE with a file of {REPO_ID}, e.g. hf:{FORMATS['h5']}. "
            f"Received: {spec!r}"
        )
    return fetch(filename)


def check_published(path: str, fmt: str) -> str:
    """Check that a file opens as the published network; return a one-line description.

    ``h5``: loads into ``unet_model_3d((1, 64, 64, 32), batch_normalization=True)`` (Keras).
    ``pt``: a state dict of the PyTorch release's network, 32 base filters (PyTorch).

    Args:
        path: the file.
        fmt: ``"h5"`` or ``"pt"``.

    Returns:
        What the file holds, in words.

    Raises:
        ValueError: the file is not that network.
        ImportError: PyTorch is missing for a ``.pt``.
    """
    if fmt == "h5":
        import unet3d

        model = unet3d.unet_model_3d((1, 64, 64, 32), batch_normalization=True)
        model.load_weights(path)
        return f"the Keras network of {FORMATS['h5']}, {model.count_params():,} parameters"
    if fmt == "pt":
        import convert_weights

        state = convert_weights.read_torch_checkpoint(path)
        convert_weights.check_torch_state(state, repr(path), expected=(1, 32, 1))
        return f"the PyTorch network of {FORMATS['pt']}, {len(state)} tensors"
    raise ValueError(f"Expected fmt in {sorted(FORMATS)}. Received: fmt={fmt!r}")


def _copy(src: str, folder: str, name: str) -> tuple[str, bool]:
    """Copy ``src`` to ``folder/name`` atomically unless an identical file is there."""
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, name)
    if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
        return dst, False
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst, True


EXAMPLE = """\
examples:
  # the Keras weights, to pretrained_weights/Genesis_Chest_CT.h5 (what the README loads)
  python keras/download_weights.py
  # the PyTorch release, then converted for Keras
  python keras/download_weights.py --format pt
  python keras/convert_weights.py pretrained_weights/Genesis_Chest_CT.pt \\
      pretrained_weights/Genesis_Chest_CT_torch.keras
  # offline, from a cache copied from another machine
  HF_HUB_OFFLINE=1 HF_HUB_CACHE=/shared/hf-cache python keras/download_weights.py
in other commands, --weights hf:Genesis_Chest_CT.h5 reads the file from the same cache.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(
        prog="download_weights.py",
        description=f"Download the published Models Genesis weights from Hugging Face "
        f"({REPO_ID}) through huggingface_hub's cache, check that they open as the published "
        "network, and copy them to a folder.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="h5",
        help="h5: Genesis_Chest_CT.h5 (Keras); pt: Genesis_Chest_CT.pt (PyTorch) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--to",
        default="pretrained_weights",
        help="folder to copy the file to (default: %(default)s/)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on an error (reported as one line).
    """
    args = build_parser().parse_args(argv)
    name = FORMATS[args.format]
    try:
        _import_hub()
        if args.format == "pt":
            import convert_weights

            convert_weights.import_torch()  # before downloading: the check needs it
        cached = fetch(name)
        what = check_published(cached, args.format)
        dst, copied = _copy(cached, args.to, name)
    except (ImportError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"download_weights.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"{dst}: {what} ({'copied from' if copied else 'already the same as'} {cached})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
