"""The road turned into gold (paper Fig. 9).

    python -m jaxedit.train --config=configs/d3po_gold.py --config.model.checkpoint=/data/instruct-pix2pix \
        --config.data.images=/data/robotcar --config.data.masks=/data/robotcar_road \
        --config.data.styles=/data/styles/gold
    python -m jaxedit.train --config=configs/d3po_gold.py:tiny   # embedded tiny RANDOM model, generated scenes

Instruction "change the road into gold", edit region "road", 5 style images cycled. The paper
trains 15-40 updates of 512 samples (256 pairs) at 256 px.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config(variant: str = ""):
    return base.edit_config("change the road into gold", "gold", segment="road", variant=variant)
