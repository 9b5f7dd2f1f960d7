"""Shared test setup: the location of the real CT data."""

from pathlib import Path

import pytest

# Import paths (the repository root, keras/ and tests/) are set by pytest.ini.
ROOT = Path(__file__).resolve().parents[1]

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
