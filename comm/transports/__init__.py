"""Transports: how a key's rows travel from its attention rank to its expert rank.

``direct`` and ``two_phase`` are routes (one file each, a ``hops`` function); ``adaptive`` picks
one of them per step from a cost model measured at start-up (adaptive.py). How bytes cross one
stage's links is the job of comm/movers/.
"""

from __future__ import annotations

from comm.topology import Topology
from comm.transports import direct, two_phase
from comm.transports.route import Key, RoutePlan, build_route

ROUTES = {"direct": direct.hops, "two_phase": two_phase.hops}
TRANSPORTS = (*ROUTES, "adaptive")

__all__ = ["TRANSPORTS", "ROUTES", "Key", "RoutePlan", "build_plan"]


def build_plan(topo: Topology, name: str) -> RoutePlan:
    if name not in ROUTES:
        raise ValueError(f"unknown route {name!r}; valid: {', '.join(ROUTES)} (adaptive picks one of them)")
    return build_route(topo, name, ROUTES[name])
