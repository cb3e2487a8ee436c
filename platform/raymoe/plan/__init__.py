"""Sizing before allocating: parameter counts (:mod:`.params`), training memory per rank (:mod:`.train`) and serving
memory per GPU (:mod:`.serve`), from the model config and a layout. ``python -m raymoe.jobs.plan`` prints them.

The plan asks the runtime's own :class:`~raymoe.train.topology.Topology` which parameters each pipeline rank holds,
so what it predicts is what the training runtime builds (tests/unit/test_plan.py checks the tensor bytes).
"""
from raymoe.plan.params import ParamReport, param_report, stage_memory, train_flops_per_token
from raymoe.plan.serve import ServeLayout, ServePlan, plan_serving
from raymoe.plan.train import PRECISIONS, Cluster, RankMemory, TrainLayout, TrainPlan, plan_training

__all__ = ["ParamReport", "param_report", "stage_memory", "train_flops_per_token", "Cluster", "TrainLayout",
           "TrainPlan", "RankMemory", "PRECISIONS", "plan_training", "ServeLayout", "ServePlan", "plan_serving"]
