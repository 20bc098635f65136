"""The training methods behind `jaxedit.train`'s one loop (``config.method``): each turns the
policy's samples into an update of the train state.

    method = METHODS[config.method](config, pipe, policy, mesh, optimizer, scorer)
    phase = method.collect(params, loader, key)          # sample (+ score / reward) one update's batch
    state, metrics = method.update(state, ref_params, phase, key)

- ``d3po`` (`trainers.d3po`): pairs from the same x_T, AI-feedback scores, D3PO (Specialists).
- ``ppo`` (`trainers.ppo`): cross-attention-map reward, per-prompt advantages, PPO (InstructRL4Pix).
"""
from jaxedit.trainers.d3po import D3PO
from jaxedit.trainers.ppo import PPO

METHODS = {"d3po": D3PO, "ppo": PPO}
