"""Every case of the hostile corpus (tests/hostile.py), in place of every file the toolkit unpickles: exit 2, one
sentence naming the file, and the marker a payload would create never appears (issue 26)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hostile import build, case_names

from opd_dynamics.cli import main


@pytest.mark.parametrize("place, payload", case_names(), ids=[f"{a}-{b}" for a, b in case_names()])
def test_a_hostile_file_is_refused_in_one_sentence_and_nothing_runs(tmp_path, place, payload):
    case = build(tmp_path / "case", place, payload)
    res = CliRunner().invoke(main, ["analyze", str(case.run), "--base", str(case.base), "--out",
                                    str(tmp_path / "out"), *case.args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # no traceback
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and case.file in errors[0], res.output
    assert not case.marker.exists()
