"""`python -m raymoe.jobs.export checkpoint=<run dir | checkpoint dir | URI> out=<dir>`: a HF export of any checkpoint.

Writes ``config.json`` + safetensors, the run's tokenizer files, ``generation_config.json`` and
``expert_load.safetensors`` (:mod:`raymoe.train.export`) from a checkpoint of any layout (pp / ep / dp, native or
DeepSpeed), e.g. of a run that stopped before its final export; ``make serve MODEL=<out>`` serves the result and
``transformers.AutoModelForCausalLM.from_pretrained(<out>)`` loads it. ``checkpoint=`` names a run directory or storage
root (``s3://bucket/run``: its newest valid checkpoint) or one checkpoint (``.../checkpoints/step_00000200``, which
must then be complete and intact). No Ray is needed. A partial or damaged checkpoint, or nothing exportable, is one
line on stderr and exit status 1; a bad override exits with status 2.
"""
from __future__ import annotations

import pathlib
import sys
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from raymoe.config import ConfigError
from raymoe.jobs.configs import hydra_app, to_object

__all__ = ["ExportJobConfig", "run", "main"]


@dataclass
class ExportJobConfig:
    """Schema of ``conf/export.yaml``."""

    checkpoint: str = "???"
    out: str = "???"

    def __post_init__(self) -> None:
        from raymoe.storage import check_uri

        loc = self.checkpoint
        if "://" not in loc:
            loc = str(pathlib.Path(loc).resolve())
        try:
            self.checkpoint = check_uri(loc, what="checkpoint")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if "://" in self.out:
            raise ConfigError(f"out={self.out!r} must be a local directory (serve it from there, or upload it)")


ConfigStore.instance().store(name="export_schema", node=ExportJobConfig)


def run(cfg: ExportJobConfig) -> pathlib.Path:
    """Export the checkpoint ``cfg.checkpoint`` names into ``cfg.out``; returns the directory."""
    from raymoe.train.export import export_checkpoint, find_checkpoint

    ref = find_checkpoint(cfg.checkpoint)
    print(f"exporting {ref.location} (step {ref.step})", flush=True)
    out = export_checkpoint(ref, pathlib.Path(cfg.out).resolve())
    print(f"HF export  : {out}  (make serve MODEL={out})")
    return out


@hydra_app("export")  # @hydra.main over conf/export.yaml; an invalid override -> one line on stderr, exit 2
def main(dcfg: DictConfig) -> None:
    from raymoe.checkpoint import CheckpointCorrupt

    cfg = to_object(dcfg, ExportJobConfig)
    try:
        run(cfg)
    except (CheckpointCorrupt, FileNotFoundError, ValueError) as e:
        print(f"raymoe.jobs.export: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
