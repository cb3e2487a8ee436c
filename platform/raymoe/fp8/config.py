"""FP8 training configuration (re-exported by :mod:`raymoe.config`).

One dataclass, validated in ``__post_init__``; YAML under ``conf/`` only selects and overrides it. Defaults follow
DeepSeek-V3 §3.3: E4M3 everywhere, 1×128 activation tiles, 128×128 weight blocks, online amax scaling with the
``amax >= 1e-4`` clamp, FP32 promotion every 128 K-elements (the emulation and the kernels promote once per block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FP8Config", "DEFAULT_SKIP_PATTERNS", "BACKENDS"]

#: Module-name fragments that stay in high precision (paper §3.3.1: embedding, output head, MoE gating).
#: Matched case-insensitively against every dot-separated component of the qualified module name.
#: Norms and the attention core are not ``nn.Linear`` modules, so they are never converted anyway.
DEFAULT_SKIP_PATTERNS: tuple[str, ...] = ("lm_head", "head", "embed", "router", "gate")

#: ``auto`` picks per device: CPU → ``emulate``; CUDA → ``scaled_mm`` (blockwise cuBLASLt, sm90+) if it probes
#: fine, else ``triton``, else ``emulate``.
BACKENDS: tuple[str, ...] = ("auto", "emulate", "triton", "scaled_mm")


@dataclass
class FP8Config:
    """Knobs of the FP8 recipe.

    Attributes:
        enabled: swap selected ``nn.Linear`` layers for :class:`raymoe.fp8.FP8Linear` before ``deepspeed.initialize``.
        backend: GEMM/quantization back-end, one of :data:`BACKENDS`.
        pow2_scales: round every scale up to a power of two (``ue8m0`` in DeepSeek's code). Makes the 1×128 → 128×1
            re-tiling of Wgrad and the dequantization exact, costs < 1 bit of range per tile.
        compile: ``torch.compile`` the CPU quantize/dequantize kernels (4–5× faster than eager; ~22 s cold compile,
            ~2 s per function with a warm Inductor cache). Falls back to eager with a warning if compile fails.
            Off by default so unit tests stay fast; training and bench configs should turn it on.
        skip_patterns: module-name fragments left in high precision (see :data:`DEFAULT_SKIP_PATTERNS`).
        min_features: Linears with ``in_features`` or ``out_features`` below this stay in high precision (a 1×128
            tile on an 8-wide layer only adds padding work and error).
        fp8_wgrad: run Wgrad through FP8 too (paper: yes). ``False`` keeps Wgrad in BF16 for ablations.
        guard: track non-finite amax per layer so a training step can be skipped and the layer named.
        accum_mantissa_bits: ``None`` (default) accumulates in FP32. An int makes every FP8 GEMM of the converted
            layers emulate a tensor-core accumulator that keeps that many bits (H800: ~14) with FP32 promotion every
            ``promote_every`` K-elements (:func:`~raymoe.fp8.gemm.fp8_gemm_limited_accum`) — float64 and a loop over
            K/32, so only for ablations on tiny models (why N_C = 128 matters).
        promote_every: promotion interval N_C of that emulation: 32, 64 or 128 (paper), or 0 = never promote.
    """

    enabled: bool = False
    backend: str = "auto"
    pow2_scales: bool = False
    compile: bool = False
    skip_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_PATTERNS))
    min_features: int = 16
    fp8_wgrad: bool = True
    guard: bool = True
    accum_mantissa_bits: int | None = None
    promote_every: int = 128

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8.backend={self.backend!r} is not one of {BACKENDS}")
        if self.min_features < 1:
            raise ValueError(f"fp8.min_features must be >= 1, got {self.min_features}")
        if self.accum_mantissa_bits is not None and not 4 <= self.accum_mantissa_bits <= 24:
            raise ValueError(f"fp8.accum_mantissa_bits must be in [4, 24] or None, got {self.accum_mantissa_bits}")
        if self.promote_every not in (0, 32, 64, 128):
            raise ValueError(f"fp8.promote_every must be 0, 32, 64 or 128 (a divisor of the 128-wide scale blocks), "
                             f"got {self.promote_every}")
        self.skip_patterns = [str(p).lower() for p in self.skip_patterns]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
