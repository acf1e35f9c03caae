import json

import pytest

from service.cli import main


def test_model_info_json_reports_paper_count(capsys):
    assert main(["model-info", "--variant", "omnet_cga", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "omnet_cga"
    assert abs(info["parameters"] - 13.814e6) / 13.814e6 < 1e-3
    assert info["flops_per_patch"] > 1e10


def test_model_info_text_small_width(capsys):
    assert main(["model-info", "--variant", "omnet", "--width", "4"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs" in out


def test_bad_width_is_one_line_and_non_zero(capsys):
    assert main(["model-info", "--width", "-1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "width" in err and "Traceback" not in err


def test_unknown_variant_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["model-info", "--variant", "unet"])
    assert exc.value.code == 2
