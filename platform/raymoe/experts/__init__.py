"""Expert parallelism (EP): the routed experts of each MoE layer spread over ``ep`` ranks, tokens exchanged all-to-all.

Layout
------
EP is carved out of data parallelism. Within a pipeline stage the ``dp`` replicas are split into groups of ``ep``
consecutive ranks; every rank of an ep group still processes its **own** micro-batches (different tokens, as in plain
DP) and holds a full copy of every non-expert parameter (attention, norms, router, shared experts, embedding/head),
but only ``E/ep`` of each layer's ``E`` routed experts. Ownership is contiguous: ep rank ``r`` holds global experts
``[r·E/ep, (r+1)·E/ep)`` (:func:`expert_range`; ``E % ep == 0`` is required). The held weights keep the names and
layout of :class:`~raymoe.model.moe.RoutedExperts` (``gate_proj``/``up_proj [E/ep, D, I]``,
``down_proj [E/ep, I, D]``), so a sharded model's state-dict key is the full model's key and rank r's tensor is the
full tensor's rows ``[r·E/ep, (r+1)·E/ep)``.

Gradients: after backward, a rank's expert-weight gradients are the **sum** over the losses of all ranks of its ep
group (the rows of every rank were run through them), while its non-expert gradients come from its own loss only.
Hence: reduce non-expert gradients over all dp ranks as usual, but expert gradients only across the ``dp/ep`` ranks
that hold the same experts (same ep rank in the other ep groups) — and if dense gradients are *averaged* over
``dp``, divide expert gradients by ``ep`` as well before averaging them over their ``dp/ep`` replicas.

Exchange protocol (one MoE layer, :meth:`ExpertParallelExperts.forward`)
------------------------------------------------------------------------
With ``T`` local tokens, top-``k`` routing, ``ep`` ranks, ``E_l = E/ep``:

1. sort the ``T·k`` (token, slot) pairs by **global** expert id (stable) and gather the rows ``[T·k, D]``; since
   ownership is contiguous, the rows for rank ``r`` form one contiguous block, itself grouped by expert;
2. exchange the per-expert counts first: ``all_to_all_single`` of the int64 ``[ep·E_l]`` bincount with equal splits
   ``E_l`` → ``[ep (source), E_l]``: how many rows each source sends to each local expert. The split sizes of the
   token exchange follow (rows sent per destination, rows received per source) — one host sync for both;
3. all-to-all the token rows with those uneven splits (:func:`all_to_all_uneven`); they arrive source-major;
4. permute them expert-major (:func:`source_to_expert_major`), run the local experts with
   ``RoutedExperts.forward_grouped`` (``[N, D]`` rows, ``[E_l]`` counts summed over sources — so the hand-written
   backward, CPU low-precision row bucketing, deferred weight gradients and FP8 all apply unchanged), permute back;
5. all-to-all the outputs back with the splits swapped, un-sort and combine with the gates ``Σ_k w[t,k]·y[t,k]``.

Backward mirrors it: each differentiable all-to-all's backward is the reverse exchange (send/recv splits swapped),
the permutations' backward is the inverse gather. The counts exchange carries no gradient. Because backward contains
collectives, **every rank of the group must run forward and backward of every MoE layer in the same order**, even
with zero tokens (T = 0 works; a rank receiving no rows still joins both exchanges). The router is untouched and
remains the only place that chooses experts; its per-expert token counts (``RouteResult.counts [E]``, the
``expert_counts`` of the model output) are still those of this rank's own tokens, in global expert ids, so the bias
balancer sums them over the dp ranks exactly as without EP.

Node-limited routing = group-limited routing
--------------------------------------------
The router (:func:`~raymoe.model.moe.route`) splits the ``E`` experts into ``n_group`` contiguous groups of
``E/n_group``, keeps the ``topk_group`` groups with the largest sum of their top-2 biased scores, and picks the top-k
experts inside them. With contiguous ownership:

* ``n_group % ep == 0``: each ep rank holds ``n_group/ep`` whole groups (group ``j`` lies on rank
  ``j // (n_group/ep)``), so a token's rows go to at most ``min(topk_group, k, ep)`` ranks. With ``n_group == ep``
  (one group per rank) the group choice *is* the rank choice: group-limited routing is exactly V3's node-limited
  routing with ``M = topk_group`` (V3: 8 groups on 8 nodes, ``topk_group = 4``, scoring each node by its top
  ``k/M = 2`` affinities). With ``n_group = c·ep``, ``c > 1``, the bound ``M = topk_group`` still holds but the
  selection is over groups, so a token may reach fewer ranks.
* ``ep % n_group == 0``: each group spans ``ep/n_group`` ranks; the bound is ``min(k, topk_group·ep/n_group)``.
* otherwise groups straddle rank boundaries and only ``min(k, ep)`` (and the ranks meeting the chosen groups) bound it.

EP never changes *which* experts are chosen; the bound is what limits the all-to-all traffic per token.

Public API and shapes
---------------------
* ``all_to_all_uneven(x_ND [sum(send), ...], send_splits, recv_splits, group) -> [sum(recv), ...]`` (autograd).
* ``exchange_counts(send_counts [ep·E_l] int64, group) -> [ep·E_l] int64`` (view as ``[source, E_l]``).
* ``source_to_expert_major(counts_SE [S, E_l]) -> (to_expert [N], to_source [N])``; ``permute_rows(x [N, ...], idx,
  inv) -> [N, ...]``.
* ``ExpertParallelExperts(experts, ep_rank, ep_size, group=None, num_experts=None)``: ``forward(x_TD [T, D],
  topk_idx [T, k] global ids, topk_weight [T, k]) -> [T, D]``; ``forward_grouped(x_ND [N, D], counts [E_l]) ->
  [N, D]`` (local); attributes ``expert_ids``, ``expert_slice``, ``num_global_experts``.
* ``ExpertShard({layer_idx: RoutedExperts [E_l]}, ep_rank, ep_size, num_experts, num_hidden_layers=None)``;
  ``.from_model(model, ep_rank, ep_size)``, ``.from_state_dict(sd, cfg, ep_rank, ep_size)``,
  ``shard(layer_idx, x_ND [N, D], counts [E_l]) -> [N, D]``, ``model_state_dict()``.
* ``shard_experts(model, ep_rank, ep_size, group=None, shard=None) -> model`` (in place).
* helpers ``expert_range(E, ep_rank, ep_size) -> range``, ``moe_layers(model) -> {layer_idx: MoE}``,
  ``expert_param_prefix(layer_idx, num_hidden_layers) -> str``.

Nothing here imports Ray; the process group is any ``torch.distributed`` group (gloo on CPU, NCCL on GPU, same code).
"""
from raymoe.experts.dispatch import all_to_all_uneven, exchange_counts, permute_rows, source_to_expert_major
from raymoe.experts.parallel import (
    ExpertParallelExperts,
    ExpertShard,
    expert_param_prefix,
    expert_range,
    moe_layers,
    shard_experts,
)

__all__ = [
    "all_to_all_uneven",
    "exchange_counts",
    "source_to_expert_major",
    "permute_rows",
    "ExpertParallelExperts",
    "ExpertShard",
    "shard_experts",
    "expert_range",
    "moe_layers",
    "expert_param_prefix",
]
