"""Planning with a learned world model: CEM and MPPI over action sequences (``planners``), the slot-matching goal
cost with batched rollouts (``cost``), the model-based agent (``agent``), the closed-loop PushT evaluation with its
baselines (``env_loop``) and ``hclsm plan`` (``run``)."""
from hclsm.planning.cost import SlotSet, WorldModelCost, matched_slot_cost
from hclsm.planning.planners import CEM, MPPI, PlannerConfig, make_planner

__all__ = ["CEM", "MPPI", "PlannerConfig", "SlotSet", "WorldModelCost", "make_planner", "matched_slot_cost"]
