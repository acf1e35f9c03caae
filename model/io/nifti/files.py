"""Finding a case's NIfTI files by name: BraTS case folders, label files, case lists."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from model.io.volumes import MODALITIES, MODALITY_ALIASES, InputError

PathLike = str | os.PathLike[str]


#: File-name endings (before ``.nii`` / ``.nii.gz``) of each modality and of the labels.
#: BraTS 2018-2021 write ``<case>_t1``; BraTS 2023 writes ``<case>-t1n``.
FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "t1": ("_t1", "-t1n"),
    "t1ce": ("_t1ce", "-t1c"),
    "t2": ("_t2", "-t2w"),
    "flair": ("_flair", "-t2f"),
}


LABEL_SUFFIXES: tuple[str, ...] = ("_seg", "-seg")


#: Accepted NIfTI file endings: plain, gzip- or bzip2-compressed (nibabel reads all three).
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii.bz2", ".nii")


def split_nifti_name(path: Path) -> tuple[str, str] | None:
    """Returns ``(stem, extension)`` for a NIfTI file name, ``None`` for any other name."""
    lower = path.name.lower()
    for ext in NIFTI_EXTENSIONS:
        if lower.endswith(ext) and len(lower) > len(ext):
            return path.name[: -len(ext)], path.name[-len(ext) :]
    return None


def nifti_stem(path: PathLike) -> str | None:
    """A NIfTI file's name without its ending (``.nii``, ``.nii.gz``, ``.nii.bz2``);
    None for any other name."""
    parts = split_nifti_name(Path(path))
    return parts[0] if parts else None


def strip_label_suffix(stem: str) -> str:
    """A label file's stem without its ``_seg`` / ``-seg`` ending (the case name)."""
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _match_suffix(stem: str, suffixes: tuple[str, ...]) -> bool:
    # Suffixes are matched at the very end of the stem, so "_t1" never matches "_t1ce".
    lower = stem.lower()
    return any(lower.endswith(s) for s in suffixes)


def _nifti_files(folder: Path) -> dict[Path, str]:
    """The folder's visible NIfTI files, in name order, each with its stem."""
    files: dict[Path, str] = {}
    for p in sorted(folder.iterdir()):
        parts = split_nifti_name(p)
        if p.is_file() and not p.name.startswith(".") and parts is not None:
            files[p] = parts[0]
    return files


def _check_folder(folder: PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise InputError(
            "not_found",
            f"case folder {path} does not exist or is not a folder; pass the folder that "
            f"holds the case's {', '.join(MODALITIES)} files",
            path,
        )
    return path


def _match_modalities(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {m: [] for m in MODALITIES}
    for p, stem in _nifti_files(folder).items():
        for modality, suffixes in FILE_SUFFIXES.items():
            if _match_suffix(stem, suffixes):
                found[modality].append(p)
    return found


def _expected_names(modality: str) -> str:
    return " or ".join(f"'<case>{s}.nii.gz'" for s in FILE_SUFFIXES[modality])


def find_case_files(folder: PathLike) -> dict[str, Path]:
    """Finds the four modality files of a BraTS case folder by name.

    Recognised names (``.nii``, ``.nii.gz`` or ``.nii.bz2``): ``<case>_t1``, ``<case>_t1ce``,
    ``<case>_t2``, ``<case>_flair`` (BraTS 2018-2021) and ``<case>-t1n``, ``<case>-t1c``,
    ``<case>-t2w``, ``<case>-t2f`` (BraTS 2023). Matching is case-insensitive and on the
    end of the name, so ``_t1`` never picks up a ``_t1ce`` file. Hidden files are ignored.

    Args:
        folder: the case folder.

    Returns:
        Modality -> file, in :data:`MODALITIES` order.

    Raises:
        InputError: ``not_found`` (no such folder), ``missing_modality`` (a modality has
            no file) or ``ambiguous_files`` (a modality has several files).
    """
    path = _check_folder(folder)
    found = _match_modalities(path)
    missing = [m for m in MODALITIES if not found[m]]
    if missing:
        present = [p.name for p in _nifti_files(path)]
        raise InputError(
            "missing_modality",
            f"case folder {path} has no file for {', '.join(missing)}; expected "
            + "; ".join(f"{m}: {_expected_names(m)}" for m in missing)
            + f". NIfTI files found: {present or 'none'}. Add the missing modality or "
            "rename the files to these conventions",
            path,
        )
    for modality in MODALITIES:
        if len(found[modality]) > 1:
            names = [p.name for p in found[modality]]
            raise InputError(
                "ambiguous_files",
                f"case folder {path} has several {modality} files {names}; keep exactly one",
                path,
            )
    return {m: found[m][0] for m in MODALITIES}


def find_label_file(folder: PathLike) -> Path | None:
    """Finds the label map ``<case>_seg`` / ``<case>-seg`` (``.nii``, ``.nii.gz`` or ``.nii.bz2``).

    Returns:
        The file, or ``None`` when the folder holds no label map.

    Raises:
        InputError: ``not_found`` (no such folder) or ``ambiguous_files``.
    """
    path = _check_folder(folder)
    matches = [p for p, stem in _nifti_files(path).items() if _match_suffix(stem, LABEL_SUFFIXES)]
    if len(matches) > 1:
        raise InputError(
            "ambiguous_files",
            f"case folder {path} has several label maps {[p.name for p in matches]}; "
            "keep exactly one",
            path,
        )
    return matches[0] if matches else None


def find_cases(folder: PathLike) -> list[Path]:
    """Lists the sub-folders of ``folder`` that hold a file for every modality, sorted.

    Raises:
        InputError: ``not_found`` when ``folder`` is not a folder.
    """
    root = _check_folder(folder)
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and all(_match_modalities(p).values())
    )


def normalise_mapping(paths: Mapping[str, PathLike]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for key, value in paths.items():
        modality = MODALITY_ALIASES.get(str(key).lower(), str(key).lower())
        if modality not in MODALITIES:
            raise InputError(
                "unknown_modality",
                f"unknown modality {key!r} (file {value}); use the keys {', '.join(MODALITIES)}",
                value,
            )
        if modality in out:
            raise InputError(
                "ambiguous_files",
                f"two files given for {modality}: {out[modality]} and {value}; give one",
                value,
            )
        out[modality] = Path(value)
    missing = [m for m in MODALITIES if m not in out]
    if missing:
        raise InputError(
            "missing_modality",
            f"no file given for {', '.join(missing)}; a case needs all of {', '.join(MODALITIES)}",
        )
    return {m: out[m] for m in MODALITIES}


def case_name_from_file(path: Path, suffixes: tuple[str, ...] = ()) -> str:
    stem = split_nifti_name(path)
    name = stem[0] if stem else path.name
    for s in suffixes:
        if name.lower().endswith(s):
            return name[: -len(s)] or name
    return name
