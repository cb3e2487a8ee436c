"""The training controller's checkpoints: save, resume, fall back past a damaged one, export to HF.

Checkpoints (:mod:`raymoe.checkpoint`) hold the ranks' files (sharded safetensors for the native runtime; DeepSpeed
engine files for ``dp_impl=deepspeed``) plus ``coordinator.json`` / ``coordinator.safetensors`` (step, tokens,
sampler state, biases, history — no pickles) and ``layout.json``. They live under ``train.storage_path`` (default: the
run directory; an object store such as ``s3://bucket/run`` when the nodes share no disk, :mod:`raymoe.storage`): each
rank puts its own files there and reports their hashes, the controller writes the manifest last, and
``train.resume=auto`` continues from the newest valid one — from any node and any run directory — so an interrupted
run followed by a resume reproduces the uninterrupted loss curve exactly (fp32). A checkpoint whose file fails its
hash while being loaded is skipped for the previous one. The HF export (``hf/``) and ``summary.json`` are uploaded
to the storage too; ``metrics.jsonl`` and wandb stay in the (node-local) run directory.

:class:`CheckpointMixin` is a part of :class:`raymoe.train.controller.TrainController` (it uses the controller's
run, group, storage, sampler, balancer, step counters and phase clock) kept in its own module.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
from typing import Any, Iterator, Optional

import torch

from raymoe import checkpoint as ckpt
from raymoe.storage import stage_and_put
from raymoe.train.export import EXTRA_DIR, export_checkpoint, write_extra
from raymoe.train.phases import Phase
from raymoe.train.run_state import check_compatible, load_coordinator_state, plain, save_coordinator_state

__all__ = ["CheckpointMixin"]

# the controller's one logger, whichever of its modules the code lives in (log filters and tests name it)
log = logging.getLogger("raymoe.train.controller")
# what the coordinator itself reads from a checkpoint (the ranks read the rest)
_COORDINATOR_FILES = ("coordinator.json", "coordinator.safetensors", "config.json", "layout.json")


class CheckpointMixin:
    """Checkpoint, resume and export methods of :class:`~raymoe.train.controller.TrainController`."""

    def layout(self) -> dict[str, Any]:
        p = self.run.parallel
        return {"pp": p.pp, "ep": p.ep, "dp": p.dp, "schedule": p.schedule, "dp_impl": self.impl}

    def resume_if_requested(self) -> None:
        """``train.resume``: ``auto`` continues from the newest valid checkpoint in the storage, if any (one whose file
        fails its hash while loading is skipped for the previous one); a directory or storage URI continues from that
        checkpoint (any problem is an error); ``never`` starts fresh."""
        mode = self.run.train.resume
        if mode == "never":
            return
        explicit = mode != "auto"
        cands = iter([self.store.open(mode)]) if explicit else self.store.candidates()
        first = next(cands, None)
        if first is None:
            return
        with self._phase(Phase.RESUME):
            target = self._load_first(itertools.chain([first], cands), check=True, fallback=not explicit)
        if target is None:
            return
        self.resumed_from = target.location
        log.info("resumed from %s at step %d", target.location, self.step)

    def save_checkpoint(self) -> ckpt.CheckpointRef:
        """Every rank puts its files under this step's checkpoint location and reports their hashes; the controller
        adds its own files (state, config, layout, expert load) the same way, writes the manifest last and prunes."""
        with self._phase(Phase.CHECKPOINT):
            dest = self.store.begin(self.step)
            tables = list(self._survive(lambda: self.group.save(dest)))  # a hand-off on the way: saved again
            state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                     "balancer": self.balancer.state_dict(), "history": self.history,
                     "load_window": list(self.load_window)}
            tables.append(stage_and_put(dest, lambda d: self._write_own_files(d, state)))
            ref = self.store.commit(dest, self.step, ckpt.merge_files(tables), {"tokens": self.tokens})
            self.store.prune(self.run.train.keep_checkpoints)
            self.last_ckpt = ref
        return ref

    def _write_own_files(self, d: pathlib.Path, state: dict[str, Any]) -> None:
        save_coordinator_state(d, state)
        self.write_expert_load(d)
        write_extra(d / EXTRA_DIR, self.data_info, self.run.model.max_position_embeddings)  # tokenizer + generation config: any checkpoint exports alone
        (d / "config.json").write_text(json.dumps(plain(dataclasses.asdict(self.run)), indent=2))
        (d / "layout.json").write_text(json.dumps(self.layout(), indent=2))
        self._write_data_files(d)

    def _write_data_files(self, d: pathlib.Path) -> None:
        """``data.json``: the tokenizer's special ids, vocabulary size and sha256, the dataset directories (the
        tokenizer files themselves are under ``hf_extra/``, :func:`raymoe.train.export.write_extra`)."""
        keys = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_sha256", "dataset_dir",
                "dataset_dirs", "train_samples", "val_samples", "train_tokens", "val_tokens")
        (d / "data.json").write_text(json.dumps({k: self.data_info[k] for k in keys if k in self.data_info},
                                                indent=2))

    def _load_first(self, cands: Iterator[ckpt.CheckpointRef], check: bool,
                    fallback: bool = True) -> Optional[ckpt.CheckpointRef]:
        """Load the first of ``cands`` (newest first) that passes its hash checks while loading; ``check``: refuse a
        checkpoint of another model or optimizer format. None when there is no candidate at all."""
        tried: list[str] = []
        for ref in cands:
            self._set_status(checkpoint=ref.location)
            try:
                self._load(ref, check=check)
                return ref
            except ckpt.ChecksumMismatch as e:
                if not fallback:
                    raise
                log.warning("checkpoint %s failed its hash check while loading (%s); falling back to the previous "
                            "one", ref.location, e)
                tried.append(ref.location)
        if tried:  # some ranks may hold a checkpoint's state by now: never continue as if from scratch
            raise ckpt.CheckpointCorrupt(f"no checkpoint in {self.store.uri} loads: {', '.join(tried)} failed their "
                                         "hash checks; train.resume=never starts from scratch")
        return None

    def _load(self, target: ckpt.CheckpointRef, check: bool = False) -> None:
        """Coordinator state and every rank's share of one checkpoint (from an object store the coordinator fetches
        just its own small files into scratch; each rank fetches what it reads)."""
        with ckpt.local_copy(target, [f for f in _COORDINATOR_FILES if f in target.files]) as d:
            if check:
                check_compatible(d, self.run, self.impl, name=target.location)
            state = load_coordinator_state(d)
        self.group.load(target)
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.balancer.load_state_dict(state["balancer"])
        self.history = state.get("history", [])
        self.load_window.clear()
        self.load_window.extend(state.get("load_window", []))

    def write_expert_load(self, d: pathlib.Path) -> pathlib.Path:
        """``expert_load.safetensors``: tensor ``expert_load`` float32 ``[num_router_layers, E]`` — token counts per
        routed expert summed over the last ``balance.load_window_steps`` optimizer steps (rows: main MoE layers in
        order, then the MTP blocks); metadata ``window_steps`` (steps actually in the window), ``step``. Serving
        seeds its redundant-expert placement (EPLB) from it."""
        from safetensors.torch import save_file

        mc = self.run.model
        load = (torch.stack(list(self.load_window)).sum(0).float() if self.load_window
                else torch.zeros(mc.num_router_layers, mc.n_routed_experts))
        out = pathlib.Path(d) / "expert_load.safetensors"
        save_file({"expert_load": load.contiguous()}, str(out),
                  metadata={"window_steps": str(len(self.load_window)), "step": str(self.step)})
        return out

    def export_hf(self, path: str) -> str:
        """Write the model (with the balancer's current biases) as a HF DeepseekV3 checkpoint from this step's
        checkpoint (saved first when needed), any layout, either checkpoint format — the same code as
        ``python -m raymoe.jobs.export`` (:mod:`raymoe.train.export`): weights, config, tokenizer files,
        ``generation_config.json`` and ``expert_load.safetensors``.

        ``path`` is a local directory (the run directory's ``hf/``); when the storage is elsewhere the export is also
        put under ``<storage>/hf/`` (an older export there is deleted first, so files of two exports never mix)."""
        if self.last_ckpt is None or self.last_ckpt.step != self.step:
            self.save_checkpoint()
        export_checkpoint(self.last_ckpt, path)
        if self._storage_elsewhere():
            self.storage.delete("hf")
            self.storage.child("hf").put_dir(path)
        return path

    def _storage_elsewhere(self) -> bool:
        """True when ``train.storage_path`` is not the run directory: what must survive a node is copied there."""
        root = self.storage.local_root
        return root is None or root.resolve() != self.run_dir.resolve()
