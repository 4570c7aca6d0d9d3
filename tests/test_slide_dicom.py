"""DICOM WSI backend (wsidicom): the real tiny DICOM and a two-level one built from it."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import openslide
import pytest

from tests.conftest import shared_path
from tests.test_slide import gradient_rgb
from tilscore.errors import SlideOpenError
from tilscore.slide import open_slide

pytest.importorskip("wsidicom", reason="DICOM backend needs the 'dicom' extra (wsidicom)")
pydicom = pytest.importorskip("pydicom")

pytestmark = pytest.mark.real_data


def write_dicom_level(template, path, image: np.ndarray, spacing_mm: float, level: int) -> None:
    """One pyramid level as an uncompressed TILED_FULL instance cloned from `template`."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    tile = 64
    h, w = image.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    padded[:h, :w] = image
    frames = [padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].tobytes()
              for r in range(rows) for c in range(cols)]  # fmt: skip
    ds = copy.deepcopy(template)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(frames)
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "00"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * spacing_mm, h * spacing_mm
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [spacing_mm] * 2
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE" if level == 0 else "RESAMPLED"]
    ds.InstanceNumber = level + 1
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def two_level_dicom(tmp_path):
    """(path of level 0, [level-0 image, level-1 image]) in a folder with a stray file."""
    template = pydicom.dcmread(shared_path("slides", "boxes_0.dcm"))
    level0 = gradient_rgb(300, 420)
    level1 = cv2.resize(level0, (210, 150), interpolation=cv2.INTER_AREA)
    write_dicom_level(template, tmp_path / "level0.dcm", level0, 0.0005, 0)
    write_dicom_level(template, tmp_path / "level1.dcm", level1, 0.001, 1)
    (tmp_path / "notes.dcm").write_text("not DICOM")
    return tmp_path / "level0.dcm", [level0, level1]


def test_real_dicom_matches_openslide():
    path = shared_path("slides", "boxes_0.dcm")
    with open_slide(path, backend="dicom") as slide:
        assert slide._backend.__class__.__name__ == "DicomBackend"
        assert slide.vendor == "dicom"
        assert slide.level_dimensions == ((16, 16),)
        assert slide.mpp == pytest.approx(0.499)
        ours = slide.read(-4, 2, 20, 12).astype(float)
    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region((-4, 2), 0, (20, 12))).astype(float)
    reference = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    assert np.abs(ours - reference).mean() <= 1.0


def test_two_level_dicom_pyramid(two_level_dicom):
    path, images = two_level_dicom
    with open_slide(path, backend="dicom") as slide:
        assert slide.level_dimensions == ((420, 300), (210, 150))
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read(50, 70, 300, 200), images[0][70:270, 50:350])
        np.testing.assert_array_equal(
            slide._backend.read_level(1, 30, 20, 150, 100), images[1][20:120, 30:180]
        )
        assert slide.best_level(2.0) == 1
        coarse = slide.read(0, 0, 210, 150, mpp=1.0)
        np.testing.assert_array_equal(coarse, images[1])


def test_non_wsi_dicom_is_open_error(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    for backend in (None, "dicom"):
        with pytest.raises(SlideOpenError, match=r"^ct.dcm: .*not a whole-slide image"):
            open_slide(path, backend=backend)
