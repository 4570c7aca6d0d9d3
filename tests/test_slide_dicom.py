"""DICOM WSI backend: the real tiny DICOM and a two-level one built from it (wsidicom), and
sparse-tiled single-file DICOMs written here in the shape real scanners export (no
ImageType, positions only per frame, spacing only in the shared functional groups), which
OpenSlide and wsidicom refuse and the pydicom frame reader opens."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import openslide
import pytest

from tests.conftest import shared_path
from tests.test_slide import gradient_rgb
from tilscore.errors import MissingMppError, SlideOpenError
from tilscore.slide import open_slide

pytest.importorskip("wsidicom", reason="DICOM backend needs the 'dicom' extra (wsidicom)")
pydicom = pytest.importorskip("pydicom")


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


@pytest.mark.real_data
def test_real_dicom_matches_openslide():
    path = shared_path("slides", "boxes_0.dcm")
    with open_slide(path, backend="dicom") as slide:
        assert slide._backend.__class__.__name__ == "DicomBackend"
        assert slide.vendor == "dicom"
        assert slide.level_dimensions == ((16, 16),)
        assert slide.mpp == pytest.approx(0.499)
        ours = slide.read(-4, 2, width=20, height=12).astype(float)
    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region((-4, 2), 0, (20, 12))).astype(float)
    reference = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    assert np.abs(ours - reference).mean() <= 1.0
    from tilscore.slide.dicom_frames import DicomFrameBackend

    frames = DicomFrameBackend(path)  # RGB-coded JPEG frames stay RGB
    assert frames.metadata_mpp == pytest.approx(0.499)
    np.testing.assert_array_equal(frames.read_level(0, x=0, y=2, width=16, height=12),
                                  reference[:, 4:])
    frames.close()


@pytest.mark.real_data
def test_two_level_dicom_pyramid(two_level_dicom):
    path, images = two_level_dicom
    with open_slide(path, backend="dicom") as slide:
        assert slide.level_dimensions == ((420, 300), (210, 150))
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read(50, 70, width=300, height=200),
                                      images[0][70:270, 50:350])
        np.testing.assert_array_equal(
            slide._backend.read_level(1, x=30, y=20, width=150, height=100),
            images[1][20:120, 30:180],
        )
        assert slide.best_level(2.0) == 1
        coarse = slide.read(0, 0, width=210, height=150, mpp=1.0)
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


# --- sparse-tiled single-file DICOM (the pydicom frame reader) ---------------------------

def write_sparse_dicom(path, image: np.ndarray, tile: int = 64, spacing_mm: float | None = 5e-4,
                       jpeg: bool = False, absent: frozenset = frozenset(), drop: str = ""):
    """One TILED_SPARSE level as scanners export it: no ImageType, no top-level pixel
    spacing, tile positions only in PerFrameFunctionalGroupsSequence, pixel spacing only in
    the shared functional groups; frames in shuffled order, tiles in `absent` (row, col)
    left out; `drop`: an attribute to delete. Returns the frame order ((row, col) per
    frame)."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    h, w = image.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    padded[:h, :w] = image
    order = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in absent]
    np.random.default_rng(1).shuffle(order)
    tiles = [padded[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r, c in order]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer = "SM", "test scanner"
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(tiles)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.DimensionOrganizationType = "TILED_SPARSE"
    if spacing_mm is not None:
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for r, c in order:
        pos = Dataset()
        pos.ColumnPositionInTotalImagePixelMatrix = c * tile + 1
        pos.RowPositionInTotalImagePixelMatrix = r * tile + 1
        pos.XOffsetInSlideCoordinateSystem = pos.YOffsetInSlideCoordinateSystem = 0
        pos.ZOffsetInSlideCoordinateSystem = 0
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    if jpeg:
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(t, level=95) for t in tiles])
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = b"".join(t.tobytes() for t in tiles)
    ds["PixelData"].VR = "OB"
    if drop:
        delattr(ds, drop)
    ds.save_as(path, enforce_file_format=True)
    return order


@pytest.mark.parametrize("jpeg", [False, True])
def test_sparse_tiled_dicom_without_image_type_opens(tmp_path, jpeg):
    image = gradient_rgb(300, 420)
    if jpeg:  # smooth, so that JPEG's chroma subsampling costs little
        image = cv2.GaussianBlur(image, (0, 0), 3)
    path = tmp_path / "sparse.dcm"
    write_sparse_dicom(path, image, jpeg=jpeg, absent=frozenset({(1, 2)}))
    # what the issue reported: the readers before this fallback refuse the file
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    with open_slide(path) as slide:  # automatic: OpenSlide -> wsidicom -> pydicom frames
        assert type(slide._backend).__name__ == "DicomFrameBackend"
        assert slide.vendor == "dicom" and slide.level_dimensions == ((420, 300),)
        assert slide.mpp == pytest.approx(0.5)  # from the shared functional groups
        got = slide.read(-10, 20, width=400, height=260).astype(int)
    want = np.full((260, 400, 3), 255)
    want[:, 10:] = image[20:280, :390]
    want[64 - 20:128 - 20, 10 + 128:10 + 192] = 255  # the absent tile (row 1, col 2) is white
    if jpeg:
        assert np.abs(got - want).mean() < 2
    else:
        np.testing.assert_array_equal(got, want)


def test_sparse_dicom_reads_only_the_frames_a_region_touches(tmp_path, monkeypatch):
    from tilscore.slide import dicom_frames

    path = tmp_path / "sparse.dcm"
    order = write_sparse_dicom(path, gradient_rgb(300, 420))
    decoded = []
    real = dicom_frames._decode_frame
    monkeypatch.setattr(dicom_frames, "_decode_frame",
                        lambda data, lv: decoded.append(data) or real(data, lv))
    with open_slide(path, backend="dicom") as slide:
        # columns 70-169, rows 10-49: tiles (0, 1) and (0, 2)
        slide.read(70, 10, width=100, height=40)
    assert len(decoded) == 2
    assert len(order) == 35


@pytest.mark.parametrize("drop,attribute", [
    ("PerFrameFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"),
    ("TotalPixelMatrixColumns", "TotalPixelMatrixColumns"),
])
def test_sparse_dicom_missing_attribute_is_one_line(tmp_path, drop, attribute):
    path = tmp_path / "bad.dcm"
    write_sparse_dicom(path, gradient_rgb(100, 100), drop=drop)
    with pytest.raises(SlideOpenError) as err:
        open_slide(path)
    text = str(err.value)
    assert text.startswith("bad.dcm: ") and attribute in text and "\n" not in text


def test_sparse_dicom_without_spacing_asks_for_mpp(tmp_path):
    path = tmp_path / "nospacing.dcm"
    write_sparse_dicom(path, gradient_rgb(100, 100), spacing_mm=None)
    with open_slide(path) as slide:
        with pytest.raises(MissingMppError, match="--mpp"):
            _ = slide.mpp
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
