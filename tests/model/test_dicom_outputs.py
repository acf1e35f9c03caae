"""model/io/dicom/seg.py: the DICOM SEG and the Secondary Capture preview."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from model.io.dicom.outputs import write_preview_dicom
from model.io.dicom.protocols import Acquisition
from model.io.dicom.seg import SEGMENTS, AlgorithmInfo, read_dicom_seg, write_dicom_seg
from model.io.dicom.study import read_dicom_study
from model.io.dicom.write_series import write_study
from model.io.phantom import make_phantom
from model.io.preview import render_preview

SHAPE = (30, 26, 16)
ALGORITHM = AlgorithmInfo(version="9.8.7", model_name="tiny.pt", model_sha256="ab" * 32)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A phantom study whose T1ce is sagittal (its grid differs from the phantom's)."""
    images, labels, affine = make_phantom(SHAPE, seed=4)
    folder = tmp_path_factory.mktemp("seg") / "study"
    write_study(images, affine, folder, acquisitions={"t1ce": Acquisition("sagittal")})
    result = read_dicom_study(folder)
    from model.io.resample import resample_to_grid

    grid_labels = resample_to_grid(labels, affine, result.case.shape, result.case.affine, order=0)
    return result, grid_labels.astype(np.uint8)


@pytest.fixture(scope="module")
def seg_file(study, tmp_path_factory):
    result, labels = study
    return write_dicom_seg(
        labels, result.reference, tmp_path_factory.mktemp("out") / "seg.dcm", algorithm=ALGORITHM
    )


def test_seg_reads_back_voxel_for_voxel(study, seg_file):
    result, labels = study
    assert set(np.unique(labels)) == {0, 1, 2, 4}
    assert np.array_equal(read_dicom_seg(seg_file, result.reference), labels)


def test_seg_decoded_with_pydicom_alone(study, seg_file):
    """An independent reading: the per-frame source references and the packed bits."""
    result, labels = study
    seg = pydicom.dcmread(seg_file)
    rows, cols = int(seg.Rows), int(seg.Columns)
    n = int(seg.NumberOfFrames)
    bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
    frames = bits[: n * rows * cols].reshape(n, rows, cols)
    slice_of = {ds.SOPInstanceUID: z for z, ds in enumerate(result.reference)}
    value_of = {s.number: s.label for s in SEGMENTS}
    rebuilt = np.zeros(labels.shape, dtype=np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPClassUID == pydicom.uid.MRImageStorage
        z = slice_of[source.ReferencedSOPInstanceUID]
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        rebuilt[:, :, z][frame.T == 1] = value_of[number]
        # Each frame sits where its source slice is.
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(
            [float(v) for v in position],
            [float(v) for v in result.reference[z].ImagePositionPatient],
        )
    assert np.array_equal(rebuilt, labels)


def test_seg_references_the_t1ce_series_and_study(study, seg_file):
    result, _ = study
    seg = pydicom.dcmread(seg_file)
    t1ce = result.reference[0]
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == t1ce.StudyInstanceUID
    assert seg.FrameOfReferenceUID == t1ce.FrameOfReferenceUID
    assert seg.PatientID == t1ce.PatientID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == result.series["t1ce"].uid
    referenced_uids = {
        item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence
    }
    assert referenced_uids == {ds.SOPInstanceUID for ds in result.reference}
    assert seg.SeriesDescription == "omnet tumour segmentation"


def test_segments_have_codes_and_the_algorithm(seg_file):
    seg = pydicom.dcmread(seg_file)
    found = {}
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert item.AnatomicRegionSequence[0].CodeValue == "12738006"
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "omnet" and algorithm.AlgorithmVersion == "9.8.7"
        parameters = str(algorithm.AlgorithmParameters)
        assert "ab" * 32 in parameters and "tiny.pt" in parameters
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert code.CodingSchemeDesignator == "SCT"
        found[int(item.SegmentNumber)] = (item.SegmentLabel, code.CodeValue)
    assert found == {
        1: ("NCR/NET", "6574001"),
        2: ("Edema", "79654002"),
        3: ("Enhancing tumour", "108369006"),
    }
    assert seg.SoftwareVersions == "9.8.7"


def test_empty_label_map(study, tmp_path):
    result, labels = study
    empty = np.zeros_like(labels)
    path = write_dicom_seg(empty, result.reference, tmp_path / "empty.dcm")
    assert np.array_equal(read_dicom_seg(path, result.reference), empty)


def test_bad_labels_raise(study, tmp_path):
    result, labels = study
    with pytest.raises(ValueError, match="grid"):
        write_dicom_seg(labels[:-1], result.reference, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="labels"):
        write_dicom_seg(np.full_like(labels, 7), result.reference, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_preview_secondary_capture(study, tmp_path):
    result, labels = study
    case = result.case
    path = write_preview_dicom(
        case.images[3], labels, case.affine, result.reference[0], tmp_path / "p.dcm"
    )
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert ds.StudyInstanceUID == result.reference[0].StudyInstanceUID
    assert ds.PatientID == result.reference[0].PatientID
    expected = np.asarray(render_preview(case.images[3], labels, case.affine).convert("RGB"))
    assert np.array_equal(ds.pixel_array, expected)


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed"
)
def test_outputs_pass_dciodvfy(study, seg_file, tmp_path):
    result, labels = study
    preview = write_preview_dicom(
        result.case.images[3], labels, result.case.affine, result.reference[0], tmp_path / "p.dcm"
    )
    for path in (seg_file, preview):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        messages = [
            line for line in run.stderr.splitlines() if line.startswith(("Error", "Warning"))
        ]
        assert not messages, (path.name, messages)
