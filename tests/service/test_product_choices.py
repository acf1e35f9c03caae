"""The post-processing modes and tilings that the settings, the command line, the API's
schema and the command-line page offer are exactly those of model/defaults.py."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from model.defaults import (
    DEFAULT_FUSION,
    DEFAULT_POSTPROCESS,
    DEFAULT_TILING,
    DEFAULT_TTA,
    FUSION_MEANINGS,
    FUSION_RULES,
    NO_POSTPROCESS,
    POSTPROCESS_MEANINGS,
    POSTPROCESS_MODES,
    TILING_NAMES,
    TTA_MODES,
)
from service.config import SERVICE_POSTPROCESS_MODES, Settings

ROOT = Path(__file__).resolve().parents[2]
#: The modes a deployment applies to jobs that ask for post-processing: all but none.
SERVICE_MODES = set(POSTPROCESS_MODES) - {NO_POSTPROCESS}


def test_every_mode_has_its_meaning_and_the_defaults_are_offered():
    assert set(POSTPROCESS_MEANINGS) == set(POSTPROCESS_MODES)
    assert DEFAULT_POSTPROCESS in POSTPROCESS_MODES and NO_POSTPROCESS in POSTPROCESS_MODES
    assert DEFAULT_TILING in TILING_NAMES


# --------------------------------------------------------------------------- settings
def test_the_settings_accept_exactly_the_tilings():
    assert Settings().tiling == DEFAULT_TILING
    assert set(get_args(Settings.model_fields["tiling"].annotation)) == set(TILING_NAMES)
    for name in TILING_NAMES:
        assert Settings(tiling=name).tiling == name
    with pytest.raises(ValidationError, match="tiling must be 'wide' or 'paper'; got 'slow'"):
        Settings(tiling="slow")


def test_a_withdrawn_tiling_is_refused_with_the_reason():
    with pytest.raises(ValidationError) as exc:
        Settings(tiling="fast")
    message = str(exc.value)
    assert "tiling 'fast' was withdrawn" in message and "over-segments" in message
    assert "use 'wide' or 'paper'" in message


def test_the_settings_take_a_tta_mode_or_the_boolean_of_before(monkeypatch):
    assert Settings().tta == DEFAULT_TTA
    assert set(get_args(Settings.model_fields["tta"].annotation)) == set(TTA_MODES)
    for mode in TTA_MODES:
        assert Settings(tta=mode).tta == mode
    for before, mode in (("true", "all"), ("false", "off"), ("1", "all"), ("0", "off")):
        monkeypatch.setenv("OMNET_TTA", before)
        assert Settings().tta == mode
    monkeypatch.setenv("OMNET_TTA", "sideways")
    with pytest.raises(ValidationError, match="tta must be one of 'off', 'mirror', 'all'"):
        Settings()


def test_the_settings_accept_exactly_the_modes_but_none():
    assert Settings().postprocess == DEFAULT_POSTPROCESS
    assert set(SERVICE_POSTPROCESS_MODES) == SERVICE_MODES
    assert set(get_args(Settings.model_fields["postprocess"].annotation)) == set(POSTPROCESS_MODES)
    for mode in SERVICE_MODES:
        assert Settings(postprocess=mode).postprocess == mode
    for refused in (NO_POSTPROCESS, "largest"):
        with pytest.raises(ValidationError, match="postprocess must be"):
            Settings(postprocess=refused)


def test_the_settings_page_names_the_modes_and_tilings():
    fields = Settings.model_fields
    assert _named(fields["tiling"].description) == set(TILING_NAMES)
    assert _named(fields["postprocess"].description) == SERVICE_MODES
    assert _named(fields["fusion"].description) == set(FUSION_RULES)


def test_every_fusion_rule_has_its_meaning_and_the_settings_take_exactly_them(monkeypatch):
    assert set(FUSION_MEANINGS) == set(FUSION_RULES) and DEFAULT_FUSION in FUSION_RULES
    assert Settings().fusion == DEFAULT_FUSION
    for rule in FUSION_RULES:
        monkeypatch.setenv("OMNET_FUSION", rule)
        assert Settings().fusion == rule
    monkeypatch.setenv("OMNET_FUSION", "vote")
    with pytest.raises(ValidationError, match="fusion"):
        Settings()


# --------------------------------------------------------------------------- command line
def _option(command: str, flag: str) -> argparse.Action:
    from service.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if flag in a.option_strings)


@pytest.mark.parametrize(
    ("command", "flag", "names", "default"),
    [
        ("segment", "--tiling", TILING_NAMES, DEFAULT_TILING),
        ("segment", "--postprocess", POSTPROCESS_MODES, DEFAULT_POSTPROCESS),
        ("train", "--val-tiling", TILING_NAMES, DEFAULT_TILING),
        ("segment", "--tta-mode", TTA_MODES, DEFAULT_TTA),
        ("segment", "--fusion", FUSION_RULES, DEFAULT_FUSION),
    ],
)
def test_the_command_line_offers_exactly_the_names(command, flag, names, default):
    action = _option(command, flag)
    assert action.choices is not None
    assert sorted(action.choices) == sorted(names)
    assert action.default == default


@pytest.mark.parametrize(("command", "flag"), [("segment", "--tiling"), ("train", "--val-tiling")])
def test_the_command_line_refuses_a_withdrawn_tiling_with_the_reason(command, flag, capsys):
    from service.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, flag, "fast"])
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: tiling 'fast' was withdrawn" in error
    assert "use 'wide' or 'paper'" in error


def test_the_command_line_page_lists_exactly_the_names():
    text = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    tilings = re.search(r"`--tiling ([a-z|-]+)`", text)
    modes = re.search(r"`--postprocess ([a-z|-]+)`", text)
    assert tilings and modes, "docs/cli.md lists no --tiling or --postprocess choices"
    assert set(tilings.group(1).split("|")) == set(TILING_NAMES)
    assert set(modes.group(1).split("|")) == set(POSTPROCESS_MODES)


# --------------------------------------------------------------------------- API
def test_the_api_schema_describes_the_modes_a_job_can_get(tmp_path):
    from service.app import create_app

    app = create_app(Settings(storage_dir=tmp_path, open_mode=True))
    body = app.openapi()["paths"]["/v1/jobs"]["post"]["requestBody"]
    field = body["content"]["multipart/form-data"]["schema"]["properties"]["postprocess"]
    assert field["type"] == "boolean" and field["default"] is True
    assert _named(field["description"]) == SERVICE_MODES
    # true: the deployment's mode, the default's meaning given; false: none.
    default = f"default `{DEFAULT_POSTPROCESS}`: {POSTPROCESS_MEANINGS[DEFAULT_POSTPROCESS]}"
    assert default in field["description"]
    assert f"false: {POSTPROCESS_MEANINGS[NO_POSTPROCESS]}" in field["description"]


def _named(description: str | None) -> set[str]:
    """The lower-case names in backticks of a description (``OMNET_...`` are not)."""
    return set(re.findall(r"`([a-z][a-z-]*)`", description or ""))
