"""Transports for MoE dispatch/combine: routing plans (direct, two_phase) and the adaptive chooser."""

from comm.transports.plan import TRANSPORTS, RoutePlan, build_plan

__all__ = ["TRANSPORTS", "RoutePlan", "build_plan"]
