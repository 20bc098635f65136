"""RL losses for diffusion policies: advantages / preferences, D3PO and PPO.

Receives scores as arrays and the denoiser as a function; knows nothing of models or scorers.
"""
from jaxedit.rl.advantages import PromptStatTracker, combined, normalize, pair_preference, pareto_preference
from jaxedit.rl.d3po import D3POBatch, d3po_loss, timestep_order
from jaxedit.rl.ppo import PPOBatch, ppo_loss
from jaxedit.rl.update import TrainState, init_train_state
