"""RL losses for diffusion policies: advantages / preferences, D3PO and PPO.

Receives scores as arrays and the denoiser as a function; knows nothing of models or scorers.
"""
from jaxedit.rl.advantages import PromptStatTracker, combined, normalize, pair_preference, pareto_preference
from jaxedit.rl.d3po import D3POBatch, TrainState, d3po_loss, init_train_state, make_update, timestep_order
from jaxedit.rl.ppo import ppo_loss
