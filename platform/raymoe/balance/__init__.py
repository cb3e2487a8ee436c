"""Load balancing of routed experts: statistics (MaxVio, bias spread) and the auxiliary-loss-free bias balancer.

Policy lives here, outside the model (docs/balance.md §1): the router only reads its ``expert_bias`` buffer for the
top-k choice and returns per-expert counts; the coordinator sums the counts of a whole optimizer step (micro-batches,
DP ranks, MTP layers) and calls :meth:`BiasBalancer.update`. The sequence-wise auxiliary loss is part of the model
(:func:`raymoe.model.moe.seq_aux_loss`), because it needs gradients through the scores.

* :mod:`raymoe.balance.stats` — ``maxvio(counts)`` per layer, ``LoadStats`` (MaxVio_batch / MaxVio_global
  accumulators), ``bias_spread(bias)``;
* :mod:`raymoe.balance.bias` — ``bias_delta`` / ``update_bias`` (sign or proportional rule, γ),
  ``BiasBalancer`` (state for the checkpoint), ``TokenSchedule`` with the V3 γ and λ schedules;
* :mod:`raymoe.balance.sim` — ``simulate_frozen_router``: the toy γ study of docs/balance.md §5 on the real router;
* :mod:`raymoe.balance.eplb` — serving-side redundant-expert placement from loads: ``rebalance_experts``
  (hierarchical / global, greedy + swap refinement), ``balancedness``, ``trivial_placement``.

Example::

    from raymoe.balance import BiasBalancer, maxvio
    bal = BiasBalancer(num_layers=model_cfg.num_router_layers, num_experts=model_cfg.n_routed_experts, gamma=1e-3)
    counts_LE = all_reduce(sum(out.expert_counts for out in microbatch_outputs))   # [L, E] int64, global
    maxvio(counts_LE).mean()      # MaxVio_batch of this step, averaged over layers
    bal.update(counts_LE)         # b ← b + γ·sign(mean − c), identical on every rank
    model.set_expert_biases(bal.bias)
"""
from __future__ import annotations

from raymoe.balance.bias import (
    RULES,
    V3_GAMMA,
    V3_MTP_LAMBDA,
    BiasBalancer,
    TokenSchedule,
    bias_delta,
    gamma_at,
    update_bias,
)
from raymoe.balance.eplb import balancedness, rebalance_experts, trivial_placement
from raymoe.balance.sim import SimRun, simulate_frozen_router
from raymoe.balance.stats import LoadStats, bias_spread, maxvio

__all__ = [
    "maxvio",
    "LoadStats",
    "bias_spread",
    "RULES",
    "bias_delta",
    "update_bias",
    "BiasBalancer",
    "TokenSchedule",
    "V3_GAMMA",
    "V3_MTP_LAMBDA",
    "gamma_at",
    "SimRun",
    "simulate_frozen_router",
    "rebalance_experts",
    "balancedness",
    "trivial_placement",
]
