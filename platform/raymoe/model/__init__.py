"""DeepSeek-V3 model math: single-device PyTorch, no Ray, no torch.distributed.

``DeepSeekV3(ModelConfig.preset("tiny"))(input_ids)`` → :class:`ModelOutput` with ``.logits [B, T, vocab]``.
HF checkpoint import/export lives in :mod:`raymoe.model.hf`; sizing of the real model in :mod:`raymoe.plan`.
"""
from raymoe.model.cache import LatentKVCache
from raymoe.model.moe import MoE, RoutedExperts, RouteResult, Router, route, seq_aux_loss
from raymoe.model.transformer import DeepSeekV3, ModelOutput, RoutingStats, StageChunk, split_layers

__all__ = [
    "DeepSeekV3",
    "ModelOutput",
    "RoutingStats",
    "StageChunk",
    "split_layers",
    "LatentKVCache",
    "MoE",
    "Router",
    "RoutedExperts",
    "RouteResult",
    "route",
    "seq_aux_loss",
]
