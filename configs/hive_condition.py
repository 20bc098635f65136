"""HIVE condition reward loss: the reward quantised into five levels by the training set's
quantiles, ", image quality is K out of five" appended to the instruction; sampling uses "five".

    python -m jaxedit.reward_model score --model=rm/ --triples=train.jsonl --out=train_rewards.jsonl
    python -m jaxedit.train --config=configs/hive_condition.py --config.model.checkpoint=/data/hive-sft/model \
        --config.data.instructions=train_rewards.jsonl
    python -m jaxedit.train --config=configs/hive_condition.py:tiny   # generated graded edits, analytic rewards

The thresholds are computed once from all training rewards, checkpointed (method state) and
written to ``model/hive_quantiles.json`` with the text to append when editing
(", image quality is five out of five"). HIVE adopts this loss in all its experiments (App. D.3).
Otherwise as `hive_sft.py`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import hive_sft  # noqa: E402


def get_config(variant: str = ""):
    return hive_sft.build("condition", variant)
