"""The model shipped in model/weights: it loads, says what it is, and segments a real case."""

import numpy as np
import pytest

from model.evaluation.metrics import evaluate_case
from model.inference.pipeline import load_predictor, segment_case
from model.inference.tiling import TILINGS
from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case, load_labels
from model.labels import ENHANCING
from model.net.checkpoint import load_checkpoint
from model.training.data import SPLITS_DIR, read_split
from model.weights import bundled_checkpoint

BUNDLED = bundled_checkpoint()
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="this install ships no bundled model")


def test_bundled_checkpoint_states_what_it_is():
    ckpt = load_checkpoint(BUNDLED)
    assert ckpt.config.variant == "omnet_cga"
    info = ckpt.metadata["bundled"]
    assert "BraTS 2018" in info["trained_on"]
    validation = sorted(info["validation_cases"])
    assert validation == sorted(read_split(SPLITS_DIR / "multisite_val.txt"))
    assert not set(validation) & set(read_split(SPLITS_DIR / "multisite_train.txt"))
    groups = info["validation_dice_by_group"]
    assert {"CBICA", "2013", "TCIA01", "TCIA02", "TCIA10"} == set(groups)
    for region in ("WT", "TC", "ET"):
        assert 0.0 <= info["validation_dice_default"]["mean_of_9_cases"][region] <= 1.0
        assert all(0.0 <= g[region] <= 1.0 for g in groups.values())
    assert ckpt.metadata["training"]["steps"] > 0


@pytest.mark.data
def test_bundled_model_segments_a_held_out_case(tmp_path):
    from tests.conftest import data_dir

    name = read_split(SPLITS_DIR / "brats2018_val.txt")[0]
    folder = data_dir() / "brats2018" / name
    if not folder.is_dir():
        pytest.skip(f"held-out case {name} not under {data_dir()} (set OMNET_DATA_DIR)")
    case = load_case(folder)
    reference = load_labels(find_label_file(folder), like=case)
    predictor, _ = load_predictor([BUNDLED], device="cpu", layout=TILINGS["fast"])
    seg = segment_case(case, predictor)
    assert seg.labels.shape == case.shape and seg.labels.dtype == np.uint8
    assert set(np.unique(seg.labels)) <= {0, 1, 2, 4}
    scores = evaluate_case(seg.labels, reference, case.spacing, ENHANCING, ENHANCING)
    assert scores["WT"].dice > 0.5, scores["WT"]
