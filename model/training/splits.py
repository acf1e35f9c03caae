"""The bundled training/validation splits of the real cases."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

# --------------------------------------------------------------------------- runs
#: Shipped splits tried in order when none is given: the first whose cases are all
#: present is used.
BUNDLED_SPLITS = ("multisite", "brats2018")


def split_cases(
    case_dirs: Sequence[Path],
    val_names: Sequence[str] | None = None,
    train_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
) -> tuple[list[Path], list[Path]]:
    """Splits case folders into (train, validation); the two never share a case.

    With ``val_names`` those cases validate (every one must exist) and ``train_names``
    (default: all the others) train. Without, the first shipped split of
    :data:`BUNDLED_SPLITS` whose cases are all present is used (the multi-institution
    split over all 34 real cases, else the BraTS 2018 one), else the last
    ``val_fraction`` of the cases ordered by a hash of their names (at least one)
    validate: a fixed split for a fixed set of names.
    """
    by_name = {p.name: p for p in case_dirs}
    if val_names is None:
        for split in BUNDLED_SPLITS:
            bundled_val = read_split_file(f"{split}_val.txt")
            bundled_train = read_split_file(f"{split}_train.txt")
            if set(bundled_val) | set(bundled_train) <= set(by_name):
                val_names, train_names = bundled_val, train_names or bundled_train
                break
        else:
            ordered = sorted(by_name, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
            count = max(1, round(len(ordered) * val_fraction)) if len(ordered) > 1 else 0
            val_names = sorted(ordered[len(ordered) - count :])
    missing = [n for n in [*val_names, *(train_names or [])] if n not in by_name]
    if missing:
        raise ValueError(f"split names cases that are not in the data folder: {missing[:5]}")
    val_set = set(val_names)
    if train_names is None:
        train_names = [n for n in sorted(by_name) if n not in val_set]
    overlap = val_set & set(train_names)
    if overlap:
        raise ValueError(f"cases in both the training and validation split: {sorted(overlap)[:5]}")
    if not train_names:
        raise ValueError("no training cases left after the validation split")
    return [by_name[n] for n in train_names], [by_name[n] for n in sorted(val_set)]


def read_split_file(name: str) -> list[str]:
    """A split file shipped with the package (``model/splits/<name>``)."""
    from model.training.data import SPLITS_DIR, read_split

    return read_split(SPLITS_DIR / name)
