"""Fixtures shared by the image tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.images.vfat_images import SAMPLE_IDS, SAMPLE_TYPES, write_sample_image


@pytest.fixture(scope="module", params=SAMPLE_TYPES, ids=SAMPLE_IDS)
def sample_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Path:
    """A FAT image of the sample tree for each FAT type (one per module that uses it)."""
    return write_sample_image(request.param, tmp_path_factory.mktemp("vfat"))
