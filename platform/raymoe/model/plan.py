"""Moved to :mod:`raymoe.plan` (the plan lives with the runtime it describes); kept so old imports keep working."""
from raymoe.plan.params import ParamReport, param_report, stage_memory, train_flops_per_token

__all__ = ["ParamReport", "param_report", "stage_memory", "train_flops_per_token"]
