"""HIVE weighted reward loss: per-triple loss x exp(R/η), normalised to mean 1 over the update.

    python -m jaxedit.reward_model score --model=rm/ --triples=train.jsonl --out=train_rewards.jsonl
    python -m jaxedit.train --config=configs/hive_weighted.py --config.model.checkpoint=/data/hive-sft/model \
        --config.data.instructions=train_rewards.jsonl
    python -m jaxedit.train --config=configs/hive_weighted.py:tiny   # generated graded edits, analytic rewards

Rewards: the ``"reward"`` of every triple (the reward model's `score --triples` writes it). η =
``hive.eta`` (HIVE gives no value; 1.0 here, 0.2 in the tiny variant). Otherwise as `hive_sft.py`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import hive_sft  # noqa: E402


def get_config(variant: str = ""):
    return hive_sft.build("weighted", variant)
