"""Configs: every edit loads (plain and :tiny), overrides work, unknown keys are errors."""
import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDITS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "d3po_*.py")))


def _parse(*argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=["prog", *argv])
    fv(["prog", *argv])
    return fv.config


@pytest.mark.parametrize("path", EDITS, ids=os.path.basename)
def test_every_edit_config_loads(path):
    c = _parse(f"--config={path}")
    assert c.edit.instruction and c.edit.style
    assert (c.train.beta, c.train.clip_eps, c.train.lr, c.sample.eta, c.score.lam) == (0.1, 0.1, 3e-5, 1.0, 0.05)
    assert c.data.resolution == 256 and c.train.samples_per_update == 512
    tiny = _parse(f"--config={path}:tiny")
    assert tiny.model.checkpoint == "" and tiny.data.generate > 0 and tiny.workdir.endswith("_tiny")


def test_night_is_a_whole_frame_edit():
    assert _parse(f"--config={ROOT}/configs/d3po_night.py").edit.segment == ""


def test_overrides_and_typos():
    c = _parse(f"--config={ROOT}/configs/d3po_snow.py:tiny", "--config.train.lr=1e-5", "--config.train.mode=lora")
    assert c.train.lr == 1e-5 and c.train.mode == "lora"
    with pytest.raises(Exception, match="lrr"):
        _parse(f"--config={ROOT}/configs/d3po_snow.py", "--config.train.lrr=1e-5")
    with pytest.raises(Exception, match="variant"):
        _parse(f"--config={ROOT}/configs/d3po_snow.py:huge")
