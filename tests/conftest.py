"""Shared test setup: import paths and the location of the real CT data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The flat modules live in keras/ (no __init__.py, so the real keras package is not shadowed).
for p in (ROOT, ROOT / "keras"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SHARED_DATA = ROOT.parent / "shared" / "data"
CHEST_CT = SHARED_DATA / "chest_ct_512x512x141.nii.gz"
ABDOMEN_DICOM = SHARED_DATA / "abdomen_ct_dicom_20slices"


def require_shared(path: Path) -> Path:
    """Skip (saying why) when the shared real-CT data is absent."""
    if not path.exists():
        pytest.skip(f"real CT data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture
def chest_ct_path() -> Path:
    return require_shared(CHEST_CT)


@pytest.fixture
def abdomen_dicom_path() -> Path:
    return require_shared(ABDOMEN_DICOM)
