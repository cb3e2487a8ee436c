"""Inference engine for DeepSeek-V3-style MoE models on the training model's own modules (torch only, no Ray).

* :mod:`raymoe.engine.paged`     – paged latent KV cache (blocks, block tables, packed-batch views, the
  reference-counted, content-addressed block pool behind prefix caching);
* :mod:`raymoe.engine.routing`   – prefix-affinity routing of requests across engine replicas (pure policy);
* :mod:`raymoe.engine.scheduler` – sequences and the continuous-batching scheduler (chunked prefill, preemption);
* :mod:`raymoe.engine.sampling`  – sampling parameters, seeded draws, the speculative acceptance rule;
* :mod:`raymoe.engine.experts`   – MoE dispatch behind a local/sharded/replicated expert backend interface;
* :mod:`raymoe.engine.remote`    – expert shards in other processes: the gloo-pair data plane (server and client);
* :mod:`raymoe.engine.placement` – redundant-expert placement (EPLB plans, the training-recorded expert load);
* :mod:`raymoe.engine.redundancy` – the policy that grows/shrinks the expert shards from balance and throughput;
* :mod:`raymoe.engine.engine`    – :class:`LLMEngine` (``from_pretrained``, ``add_request``, ``step``, ``generate``).
"""
from raymoe.engine.engine import CompletionOutput, EngineConfig, EngineError, EngineFull, LLMEngine, RequestOutput, \
    load_tokenizer
from raymoe.engine.experts import DispatchedMoE, ExpertBackend, LoadRecorder, LocalExperts, ReplicatedExperts, \
    ShardedExperts, SlotShard, install_expert_backend
from raymoe.engine.placement import ExpertsConfig, Placement, initial_placement, read_expert_load, write_expert_load
from raymoe.engine.paged import BlockAllocator, PackedBatch, PagedLatentCache
from raymoe.engine.sampling import SamplingParams, probs_from_logits, speculative_accept

__all__ = [
    "LLMEngine", "EngineConfig", "EngineError", "EngineFull", "RequestOutput", "CompletionOutput", "load_tokenizer",
    "SamplingParams", "probs_from_logits", "speculative_accept",
    "PagedLatentCache", "PackedBatch", "BlockAllocator",
    "ExpertBackend", "LocalExperts", "ShardedExperts", "DispatchedMoE", "install_expert_backend",
    "ReplicatedExperts", "SlotShard", "LoadRecorder",
    "ExpertsConfig", "Placement", "initial_placement", "read_expert_load", "write_expert_load",
]
