"""The training methods behind `jaxedit.train`'s one loop (``config.method``): each turns the
policy's samples into an update of the train state.

    method = METHODS[config.method](config, pipe, policy, mesh, optimizer, scorer)
    phase = method.collect(params, loader, key)          # sample (+ score / reward) one update's batch
    state, metrics = method.update(state, ref_params, phase, key)

- ``d3po`` (`trainers.d3po`): pairs from the same x_T, AI-feedback scores, D3PO (Specialists).
- ``ppo`` (`trainers.ppo`): cross-attention-map reward, per-prompt advantages, PPO (InstructRL4Pix).
- ``sft`` (`trainers.sft`): supervised instruction training on triples and HIVE's weighted /
  condition reward losses (``config.hive.mode``); no sampling.

Optional static hooks the loop (and `jaxedit.export`) use when a method has them:
``model_trainable(state)`` (the tree that is evaluated and saved, e.g. the EMA; default
``state.params``) and ``write_model_extras(folder, method_state)`` (files written next to the saved
model from the method's ``get_state()``).
"""
from jaxedit.trainers.d3po import D3PO
from jaxedit.trainers.ppo import PPO
from jaxedit.trainers.sft import SFT

METHODS = {"d3po": D3PO, "ppo": PPO, "sft": SFT}
