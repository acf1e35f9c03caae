"""model/io/dicom/study.py and model/io/dicom/seg.py on the DICOM conformance corpus
(tests/dicom_corpus.py): each variant reads to the plain study's voxels or is refused
with a message that says what to do, and the SEG and Secondary Capture copy what the
source has and write empty what it lacks.

The corpus of a real BraTS case needs ../shared/data (the ``data`` tests); the
multi-frame reading is also checked on a phantom, so that it is covered without it.
"""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest

from model.io.dicom.outputs import dicom_output_problems, write_study_outputs
from model.io.dicom.scan import ENHANCED_MR_STORAGE, frame_headers
from model.io.dicom.seg import COPIED_TYPE2, read_dicom_seg
from model.io.dicom.study import read_dicom_study
from model.io.phantom import make_phantom
from model.io.volumes import InputError
from tests.dicom_corpus import FOREIGN_PATIENT, TYPE2, VARIANTS, write_corpus

#: What no message a user reads may hold: exception class names, Python internals.
_INTERNALS = re.compile(r"Error\b|Exception\b|Traceback|FileDataset|object has no attribute")


@pytest.fixture(scope="module")
def plain(dicom_corpus):
    return read_dicom_study(dicom_corpus.variants["plain"].folder)


@pytest.mark.data
@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "plain"])
def test_variant_reads_like_the_plain_study_or_says_what_to_do(dicom_corpus, plain, name):
    variant = dicom_corpus.variants[name]
    if variant.code is None:
        study = read_dicom_study(variant.folder)
        assert np.array_equal(study.case.images, plain.case.images)
        assert np.allclose(study.case.affine, plain.case.affine, atol=1e-6)
        return
    with pytest.raises(InputError) as caught:
        read_dicom_study(variant.folder)
    message = str(caught.value)
    assert caught.value.code == variant.code
    for words in variant.words:
        assert words in message
    assert str(variant.folder) in message  # the study or the file is named
    assert not _INTERNALS.search(message), message


@pytest.mark.data
def test_multiframe_variants_know_their_frames(dicom_corpus, plain):
    for name in ("legacy_enhanced", "enhanced_mr"):
        study = read_dicom_study(dicom_corpus.variants[name].folder)
        assert len(study.frames) == plain.case.shape[2]
        assert sorted(study.frames) == list(range(1, plain.case.shape[2] + 1))
        assert len({ds.SOPInstanceUID for ds in study.reference}) == 1  # one file per series
    enhanced = read_dicom_study(dicom_corpus.variants["enhanced_mr"].folder)
    assert enhanced.frames != tuple(range(1, plain.case.shape[2] + 1))  # frames shuffled
    assert enhanced.reference[0].SOPClassUID == ENHANCED_MR_STORAGE


@pytest.mark.data
@pytest.mark.parametrize(
    "name",
    ["plain", "type2_absent", "type2_empty", "foreign_descriptions", "enhanced_mr", "jpeg2000"],
)
def test_outputs_copy_the_source_and_fill_what_it_lacks(dicom_corpus, name, tmp_path):
    study = read_dicom_study(dicom_corpus.variants[name].folder)
    labels = dicom_corpus.labels
    assert dicom_output_problems(study.reference, study.frames) == []
    outputs = write_study_outputs(study, labels, tmp_path / "seg.dcm", tmp_path / "sc.dcm")
    assert outputs.failures == {}
    assert np.array_equal(
        read_dicom_seg(outputs.written["dicom_seg"], study.reference, study.frames), labels
    )
    source = study.reference[0]
    for kind in ("dicom_seg", "dicom_preview"):
        out = pydicom.dcmread(outputs.written[kind], stop_before_pixels=True)
        assert out.StudyInstanceUID == source.StudyInstanceUID
        for keyword in COPIED_TYPE2:
            assert keyword in out, (kind, keyword)  # type 2: always present
            expected = str(source.get(keyword, "") or "")
            assert str(out[keyword].value or "") == expected, (kind, keyword)
    if name == "type2_absent":
        assert not any(k in source for k in TYPE2 if k != "SeriesDate")
    if name == "foreign_descriptions":
        seg = pydicom.dcmread(outputs.written["dicom_seg"], stop_before_pixels=True)
        assert str(seg.PatientName) == FOREIGN_PATIENT


@pytest.mark.data
def test_a_seg_that_cannot_be_made_is_known_before_inference(dicom_corpus):
    study = read_dicom_study(dicom_corpus.variants["no_frame_of_reference"].folder)
    (problem,) = dicom_output_problems(study.reference, study.frames, preview=False)
    assert problem.startswith("the DICOM SEG cannot be written")
    assert "Frame Of Reference" in problem and not _INTERNALS.search(problem)


def test_a_failed_output_leaves_the_others(tmp_path, monkeypatch):
    images, labels, affine = make_phantom((32, 32, 16), seed=2)
    write_corpus(images, affine, tmp_path, names=["plain"])
    study = read_dicom_study(tmp_path / "plain")
    import model.io.dicom.seg as outputs_module

    real = outputs_module.atomic_write

    def full_disk(path, write):
        if path.name == "seg.dcm":
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(outputs_module, "atomic_write", full_disk)
    outputs = write_study_outputs(study, labels, tmp_path / "seg.dcm", tmp_path / "sc.dcm")
    assert set(outputs.written) == {"dicom_preview"}
    assert outputs.failures == {
        "dicom_seg": "the DICOM SEG could not be written ([Errno 28] No space left on device)"
    }
    assert not (tmp_path / "seg.dcm").exists()


# --------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantom_corpus(tmp_path_factory):
    images, labels, affine = make_phantom((40, 36, 20), seed=4)
    root = tmp_path_factory.mktemp("phantom-corpus")
    return write_corpus(images, affine, root, ["plain", "legacy_enhanced", "enhanced_mr"]), labels


@pytest.mark.parametrize("name", ["legacy_enhanced", "enhanced_mr"])
def test_multiframe_series_read_like_classic_ones(phantom_corpus, name, tmp_path):
    corpus, labels = phantom_corpus
    plain = read_dicom_study(corpus["plain"].folder)
    study = read_dicom_study(corpus[name].folder)
    assert np.array_equal(study.case.images, plain.case.images)
    assert np.allclose(study.case.affine, plain.case.affine, atol=1e-6)
    assert [s.uid for s in study.series.values()] == [s.uid for s in plain.series.values()]
    outputs = write_study_outputs(study, labels, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(outputs.written["dicom_seg"])
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    source = derivation.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == study.reference[0].SOPInstanceUID
    assert int(source.ReferencedFrameNumber) in study.frames
    assert np.array_equal(
        read_dicom_seg(outputs.written["dicom_seg"], study.reference, study.frames), labels
    )


def test_frame_headers_take_per_frame_then_shared_then_top_level(phantom_corpus):
    corpus, _ = phantom_corpus
    path = next(corpus["enhanced_mr"].folder.glob("*_t2/*.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = frame_headers(ds)
    assert frames is not None and len(frames) == int(ds.NumberOfFrames)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0]
    for frame, item in zip(frames, per_frame, strict=True):
        assert frame.ImagePositionPatient == item.PlanePositionSequence[0].ImagePositionPatient
        rescale = item.PixelValueTransformationSequence[0]
        assert frame.RescaleIntercept == rescale.RescaleIntercept  # per frame, not shared
        assert frame.PixelSpacing == shared.PixelMeasuresSequence[0].PixelSpacing
        assert frame.SeriesInstanceUID == ds.SeriesInstanceUID
        assert float(frame.EchoTime) == float(shared.MREchoSequence[0].EffectiveEchoTime)
        assert frame.SequenceName == ds.PulseSequenceName
    del per_frame[3].PlanePositionSequence
    assert frame_headers(ds) is None  # a frame that does not say where it lies
