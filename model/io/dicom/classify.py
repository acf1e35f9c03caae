"""Mapping the series of a study to the four modalities (step 2 of
:mod:`model.io.dicom.study`): overrides, text rules, then sequence attributes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from model.io.dicom.scan import SeriesInfo, multi_values, unusable_reason
from model.io.volumes import MODALITIES, InputError

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SeriesRule:
    """A modality recognised from a series' text (SeriesDescription, ProtocolName,
    SequenceName, lower case, with ``_-./`` read as spaces).

    Attributes:
        modality: t1, t1ce, t2 or flair.
        include: regular expression the text must match (``re.search``).
        exclude: regular expression the text must not match ("" for none).
        contrast: True: the series must be post-contrast; False: must not be; None:
            either.
    """

    modality: str
    include: str
    exclude: str = ""
    contrast: bool | None = None

    def matches(self, text: str, contrast: bool) -> bool:
        """Whether a series with this text and contrast state is this modality."""
        if self.contrast is not None and contrast != self.contrast:
            return False
        if not re.search(self.include, text):
            return False
        return not (self.exclude and re.search(self.exclude, text))


_T1_WORDS = r"\bt1|\bt1w|mprage|mp rage|\bspgr|\bbravo|\btfe\b|\bvibe|\bflash|\bfl3d|\bse t1"


_FLAIR_WORDS = r"flair|dark fluid|\btirm|\bfl2d\b"


_T2_EXCLUDE = r"flair|dark fluid|\btirm|t2\*|t2 ?star|\bswi|\bgre\b|\bhemo|\bdwi|\badc|\btrace"


#: The default rules, tried in order; the first that matches gives the modality.
DEFAULT_RULES: tuple[SeriesRule, ...] = (
    SeriesRule("flair", _FLAIR_WORDS, exclude=r"\bt1"),
    SeriesRule("t1ce", _T1_WORDS, exclude=_FLAIR_WORDS, contrast=True),
    SeriesRule("t1", _T1_WORDS, exclude=_FLAIR_WORDS, contrast=False),
    SeriesRule("t2", r"\bt2", exclude=_T2_EXCLUDE),
)


def parse_series_rules(text: str) -> tuple[SeriesRule, ...]:
    """Site rules from JSON: a list of objects with ``modality``, ``include`` and
    optionally ``exclude`` and ``contrast`` (true, false or null), e.g.
    ``[{"modality": "t1ce", "include": "mprage.*km"}]``. They are tried before
    :data:`DEFAULT_RULES` (the caller adds those).

    Raises:
        ValueError: not such a list, an unknown modality, or a bad regular expression.
    """
    if not text.strip():
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"series rules are not JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise ValueError("series rules are a JSON list of objects")
    rules = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"modality", "include", "exclude", "contrast"}:
            raise ValueError(
                f"series rule {n} must be an object with modality, include, exclude, contrast"
            )
        modality, include = item.get("modality"), item.get("include")
        exclude, contrast = item.get("exclude", ""), item.get("contrast")
        if modality not in MODALITIES:
            raise ValueError(f"series rule {n}: modality must be one of {', '.join(MODALITIES)}")
        if not isinstance(include, str) or not include or not isinstance(exclude, str):
            raise ValueError(f"series rule {n}: include (and exclude) must be regular expressions")
        if contrast not in (True, False, None):
            raise ValueError(f"series rule {n}: contrast must be true, false or null")
        for pattern in (include, exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"series rule {n}: bad regular expression ({exc})") from None
        rules.append(SeriesRule(modality, include, exclude, contrast))
    return tuple(rules)


#: Words saying that a series was acquired after (or before) the contrast agent.
_POST_CONTRAST = re.compile(
    r"\bpost|\bgad|\bgd\b|\bgado|contrast|\bce\b|\bt1ce\b|\bt1c\b|\+ ?c\b|\bc\+|\bkm\b|\+km"
)


_PRE_CONTRAST = re.compile(r"\bpre\b|precontrast|\bnative?\b|\bnon ?contrast|\bwithout")


def series_text(ds: Dataset) -> str:
    """SeriesDescription, ProtocolName and SequenceName of a header, normalised for
    :class:`SeriesRule` (lower case, ``_-./`` as spaces)."""
    parts = [str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")]
    parts.append(str(ds.get("SequenceName", "") or ""))
    return re.sub(r"[_\-./]+", " ", " | ".join(parts).lower())


def is_post_contrast(ds: Dataset) -> bool:
    """Whether a series is post-contrast: its text says so ("post", "gad", "+C", ...),
    or, unless the text says "pre"/"native", its ContrastBolusAgent is set."""
    text = re.sub(
        r"[_\-./]+",
        " ",
        " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")).lower(),
    )
    if _PRE_CONTRAST.search(text):
        return False
    return bool(_POST_CONTRAST.search(text) or str(ds.get("ContrastBolusAgent", "") or "").strip())


def float_attribute(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def classify_by_sequence(ds: Dataset) -> str | None:
    """The modality a series' sequence attributes suggest, or None.

    FLAIR: inversion recovery with TI >= 1500 ms and TE >= 60 ms; T2: TE >= 60 ms and
    TR >= 1500 ms (no long inversion); T1: TE < 30 ms with TR < 1000 ms or an inversion
    time below 1500 ms (MPRAGE), T1ce when post-contrast (:func:`is_post_contrast`).
    """
    tr, te, ti = (
        float_attribute(ds, "RepetitionTime"),
        float_attribute(ds, "EchoTime"),
        float_attribute(ds, "InversionTime"),
    )
    if te is None:
        return None
    scanning = {str(v).upper() for v in multi_values(ds.get("ScanningSequence"))}
    inversion = "IR" in scanning or (ti is not None and ti > 0)
    if inversion and ti is not None and ti >= 1500 and te >= 60:
        return "flair"
    if te >= 60 and tr is not None and tr >= 1500 and not (ti is not None and ti >= 1500):
        return "t2"
    if te < 30 and ((tr is not None and tr < 1000) or (inversion and ti is not None and ti < 1500)):
        return "t1ce" if is_post_contrast(ds) else "t1"
    return None


def classify_series(
    header: Dataset, rules: Sequence[SeriesRule] = DEFAULT_RULES, use_sequence: bool = True
) -> str | None:
    """The modality ``rules`` (then, with ``use_sequence``, the sequence attributes)
    give a series, from the header of one of its images; None when nothing matches."""
    text = series_text(header)
    contrast = is_post_contrast(header)
    for rule in rules:
        if rule.matches(text, contrast):
            return rule.modality
    return classify_by_sequence(header) if use_sequence else None


def _describe_all(all_series: Sequence[SeriesInfo], notes: Mapping[str, str]) -> str:
    return "; ".join(f"{s.label()} -> {notes.get(s.uid, 'not recognised')}" for s in all_series)


def _find_override(
    all_series: Sequence[SeriesInfo], modality: str, value: str, where: Path
) -> SeriesInfo:
    text = str(value).strip()
    for s in all_series:
        if s.uid == text:
            return s
    numbered = [s for s in all_series if text.isdigit() and s.number == int(text)]
    if len(numbered) == 1:
        return numbered[0]
    listing = "; ".join(s.label() for s in all_series)
    raise InputError(
        "unknown_series",
        f"{modality}={text} names no series of the study "
        f"{'(several share that SeriesNumber) ' if numbered else ''}"
        f"; give a SeriesInstanceUID (or a unique SeriesNumber) of: {listing}",
        where,
    )


def parse_series_overrides(items: Iterable[str]) -> dict[str, str]:
    """``MOD=UID`` items (``t1ce=1.2.840...``, or a SeriesNumber) as overrides of
    :func:`map_series`.

    Raises:
        ValueError: an item that is not ``MOD=UID``, an unknown modality, or one given
            twice.
    """
    overrides: dict[str, str] = {}
    for item in items:
        modality, sep, uid = item.partition("=")
        modality, uid = modality.strip().lower(), uid.strip()
        if not sep or not modality or not uid:
            raise ValueError(f"a series override is MOD=UID (e.g. t1ce=1.2.840...), got {item!r}")
        if modality not in MODALITIES:
            raise ValueError(
                f"unknown modality {modality!r} in series override {item!r}; use "
                f"{', '.join(MODALITIES)}"
            )
        if modality in overrides:
            raise ValueError(f"the series of {modality} is given twice")
        overrides[modality] = uid
    return overrides


def map_series(
    all_series: Sequence[SeriesInfo],
    *,
    rules: Sequence[SeriesRule] = DEFAULT_RULES,
    overrides: Mapping[str, str] | None = None,
    use_sequence: bool = True,
    where: PathLike = "",
) -> dict[str, SeriesInfo]:
    """Picks the series of each modality (see the module docstring, step 2).

    Args:
        all_series: the study's series (:func:`scan_study`).
        rules: the text rules, tried in order.
        overrides: modality -> SeriesInstanceUID (or a unique SeriesNumber); these
            series are used whatever the rules say.
        use_sequence: classify series that no rule matches by their sequence attributes.
        where: the study, for messages.

    Returns:
        Modality -> series, in :data:`~model.io.volumes.MODALITIES` order.

    Raises:
        InputError: ``unknown_modality`` or ``unknown_series`` (a bad override),
            ``ambiguous_series`` (one series given for two modalities, or several
            candidates), ``missing_modality``, or the code of a chosen series that cannot
            be used (``multiframe``, ``derived_series``, ``unsupported_series``).
    """
    place = Path(where)
    chosen = _overridden(all_series, overrides or {}, place)
    notes: dict[str, str] = {s.uid: m for m, s in chosen.items()}
    candidates = _candidates(
        all_series, [m for m in MODALITIES if m not in chosen], notes, rules, use_sequence
    )
    for modality, found in candidates.items():
        if len(found) > 1 and any(not s.derived for s in found):
            found[:] = [s for s in found if not s.derived]
        if len(found) > 1:
            raise InputError(
                "ambiguous_series",
                f"several series of DICOM study {place} look like {modality}: "
                f"{'; '.join(s.label() for s in found)}. Name the one to use, "
                f"{modality}=<SeriesInstanceUID>. All series: {_describe_all(all_series, notes)}",
                place,
            )
    missing = [m for m, found in candidates.items() if not found]
    if missing:
        raise InputError(
            "missing_modality",
            f"DICOM study {place} has no series recognised as {', '.join(missing)}. Series "
            f"found: {_describe_all(all_series, notes)}. Name the series to use, e.g. "
            f"{missing[0]}=<SeriesInstanceUID>",
            place,
        )
    for modality, found in candidates.items():
        chosen[modality] = found[0]
    return {m: chosen[m] for m in MODALITIES}


def _overridden(
    all_series: Sequence[SeriesInfo], overrides: Mapping[str, str], place: Path
) -> dict[str, SeriesInfo]:
    """The series that ``overrides`` name, checked usable and distinct."""
    chosen: dict[str, SeriesInfo] = {}
    for key, value in overrides.items():
        modality = str(key).lower()
        if modality not in MODALITIES:
            raise InputError(
                "unknown_modality",
                f"unknown modality {key!r} in the series mapping; use {', '.join(MODALITIES)}",
                place,
            )
        series = _find_override(all_series, modality, value, place)
        twice = [m for m, s in chosen.items() if s.uid == series.uid]
        if twice:
            raise InputError(
                "ambiguous_series",
                f"{series.label()} is given for both {twice[0]} and {modality}; give each "
                "modality its own series",
                place,
            )
        problem = unusable_reason(series)
        if problem:
            raise InputError(
                problem[0], f"{series.label()} given for {modality}: {problem[1]}", place
            )
        chosen[modality] = series
    return chosen


def _candidates(
    all_series: Sequence[SeriesInfo],
    modalities: Sequence[str],
    notes: dict[str, str],
    rules: Sequence[SeriesRule],
    use_sequence: bool,
) -> dict[str, list[SeriesInfo]]:
    """The usable series the rules recognise as each of ``modalities``; ``notes`` gets
    how each series was read (for messages)."""
    candidates: dict[str, list[SeriesInfo]] = {m: [] for m in modalities}
    for series in all_series:
        if series.uid in notes:
            continue
        problem = unusable_reason(series)
        if problem:
            notes[series.uid] = f"skipped: {problem[1]}"
            continue
        guess = classify_series(series.first, rules, use_sequence)
        if guess is None:
            continue
        notes[series.uid] = guess + (" (derived)" if series.derived else "")
        if guess in candidates:
            candidates[guess].append(series)
    return candidates
