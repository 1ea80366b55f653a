"""two_phase (Janus): aggregate per node pair, so ONE packet per node pair crosses the network.

Same node: ``(a, e, e, e)``. Otherwise ``(a, g, x, e)``: stage 0 gathers a node's rows bound for
node m onto the gateway ``g = gateway(node(a), m)`` over NVLink, stage 1 sends one packet per node
pair, stage 2 spreads it from the entry ``x = entry(node(a), m)`` to the expert ranks of node m.
Gateways are spread over the sending node's attention ranks by destination node, entries over the
receiving node's expert ranks by source node, so a source that is its own gateway (or a
destination that is its own entry) saves a hop: with one rank per node two_phase == direct.
"""

from __future__ import annotations

from comm.topology import Topology


def _spread(topo: Topology, node: int, peer_node: int, prefer_attention: bool) -> int:
    """The rank on `node` that handles traffic with `peer_node`: peers are spread round-robin over the
    node's ranks of the preferred role (any rank if it has none)."""
    local = topo.ranks_on_node(node)
    cands = [r for r in local if (topo.ranks[r].is_attention if prefer_attention else topo.ranks[r].is_expert)]
    cands = cands or list(local)
    others = [n for n in range(topo.num_nodes) if n != node]
    return cands[others.index(peer_node) % len(cands)]


def gateway(topo: Topology, src_node: int, dst_node: int) -> int:
    """Rank on `src_node` that gathers the rows of src_node bound for dst_node."""
    return _spread(topo, src_node, dst_node, prefer_attention=True)


def entry(topo: Topology, src_node: int, dst_node: int) -> int:
    """Rank on `dst_node` that receives node src_node's packet and forwards it locally."""
    return _spread(topo, dst_node, src_node, prefer_attention=False)


def hops(topo: Topology, a: int, e: int) -> tuple[int, int, int, int]:
    n, m = topo.node_of(a), topo.node_of(e)
    if n == m:
        return (a, e, e, e)
    return (a, gateway(topo, n, m), entry(topo, n, m), e)
