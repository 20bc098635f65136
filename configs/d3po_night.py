"""Nighttime: a global edit, whole-frame mask (paper Fig. 11).

    python -m jaxedit.train --config=configs/d3po_night.py --config.model.checkpoint=/data/instruct-pix2pix \
        --config.data.images=/data/robotcar --config.data.styles=/data/styles/night
    python -m jaxedit.train --config=configs/d3po_night.py:tiny   # embedded tiny RANDOM model, generated scenes

Instruction "change the time to nighttime", whole-frame mask, 5 style images cycled. The paper
trains 15-40 updates of 512 samples (256 pairs) at 256 px.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config(variant: str = ""):
    return base.edit_config("change the time to nighttime", "night", segment="", variant=variant)
