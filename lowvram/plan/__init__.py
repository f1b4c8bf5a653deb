"""The memory manager's brain: measure LTX-2 on fake tensors, budget candidate settings, choose the fastest that fits.

Entry point: `plan_run(cfg, profile, choose=...) -> Plan`. Nothing here loads weights or touches a GPU.
"""

from lowvram.plan.budget import Settings
from lowvram.plan.plan import PeakPrediction, Plan, budget_settings, plan_run, predict_peak, predict_step_time

__all__ = ["PeakPrediction", "Plan", "Settings", "budget_settings", "plan_run", "predict_peak", "predict_step_time"]
