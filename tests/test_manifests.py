"""The real checkpoints' configs (third_party/checkpoints) build jaxedit models of the right size."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxedit.models import load, text, unet, vae

MANIFESTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "third_party", "checkpoints", "*.json")))
MODELS = {"unet": unet, "vae": vae, "text_encoder": text}


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
@pytest.mark.parametrize("part", sorted(MODELS))
def test_real_config_parameter_count(path, part):
    manifest = json.load(open(path))
    mod = MODELS[part]
    module = mod.build(mod.Config.from_dict(manifest[f"{part}_config"]))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(load.abstract_params(module)))
    assert count == manifest["parameters"][part]
