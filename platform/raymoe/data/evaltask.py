"""The training run's validation windows as an lm-evaluation-harness task, so that the perplexity the harness reports
over the served model is the run's ``val/loss``, token for token.

What ``val/loss`` covers. Evaluation reads samples ``0 .. n-1`` of the validation split, ``n = eval_batches ×
micro_batch_size``; sample ``i`` is the window ``stream[i·T : i·T + T + 1]`` (``T = seq_len``) of the packed token
stream, so consecutive windows share one token, and ``val/loss`` is the mean next-token loss over the ``n·T``
predicted tokens ``stream[1 : n·T + 1]``.

What the harness computes. A ``loglikelihood_rolling`` document is tokenized (``add_special_tokens=False``) and cut
into windows of ``L − 1`` predicted tokens, each fed with the one token before it, ``L`` being the model's length;
the first window's "token before" is the model's prefix token (``custom_prefix_token_id`` of ``local-completions``).
With the document = the text of ``stream[1 : n·T + 1]``, the prefix token ``stream[0]`` and ``L = T + 1``, its windows
are the run's evaluation windows exactly — provided the text tokenizes back to the same ids, which
:func:`write_val_task` checks (a tokenizer that does not round-trip gets no task, and says so). The harness' API
models keep one position for a generated token (their ``L`` is their ``max_length`` argument − 1), so the task's
``max_length`` for ``local-completions`` is ``T + 2``.

Converting. The harness reports ``bits_per_byte = −Σ log p / (bytes · ln 2)`` over the document; so
``val/loss = bits_per_byte · bytes · ln 2 / (n·T)`` (:func:`val_loss_from_bits_per_byte`; ``bytes`` and ``n·T`` are in
the task's ``val_task.json``). Data with a loss mask (chat data) has no such task: the harness scores every token.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any, Optional

__all__ = ["TASK_NAME", "write_val_task", "val_loss_from_bits_per_byte", "harness_model_args"]

TASK_NAME = "raymoe_val"


def _stream(val_ds: Any) -> Optional[Any]:
    """The contiguous packed stream behind ``val_ds`` (a PackedDataset, or a one-part mixture of one), else None."""
    parts = getattr(val_ds, "parts", None)
    if parts is not None:
        if len(parts) != 1:
            return None
        val_ds = parts[0]
    return val_ds if hasattr(val_ds, "tokens") and hasattr(val_ds, "seq_len") else None


def write_val_task(val_ds: Any, tokenizer_file: str | pathlib.Path, num_samples: int,
                   out_dir: str | pathlib.Path) -> dict[str, Any]:
    """Write ``<out_dir>/{val.jsonl, raymoe_val.yaml, val_task.json}`` for the first ``num_samples`` validation windows
    and return ``val_task.json``'s content; or return ``{"skipped": reason}`` (nothing written) when the run's
    validation data cannot be scored token for token by the harness."""
    from tokenizers import Tokenizer

    ds = _stream(val_ds)
    if ds is None:
        return {"skipped": "the validation set is a mixture of several sources, not one packed stream"}
    if getattr(ds, "has_mask", False):
        return {"skipped": "the validation data has a loss mask (chat data); the harness scores every token"}
    T = int(ds.seq_len)
    n = min(int(num_samples), len(ds))
    if n < 1:
        return {"skipped": "no validation samples"}
    ids = [int(t) for t in ds.tokens(0, n * T + 1)]
    tok = Tokenizer.from_file(str(tokenizer_file))
    text = tok.decode(ids[1:], skip_special_tokens=False)
    back = tok.encode(text, add_special_tokens=False).ids
    if back != ids[1:]:
        at = next((i for i, (a, b) in enumerate(zip(back, ids[1:])) if a != b), min(len(back), len(ids) - 1))
        return {"skipped": f"the validation text does not tokenize back to the same ids (first difference at token "
                           f"{at}); its harness perplexity would not be over the same tokens"}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "val.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    (out / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\noutput_type: loglikelihood_rolling\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    meta = {"task": TASK_NAME, "samples": n, "seq_len": T, "tokens": n * T, "bytes": len(text.encode("utf-8")),
            "words": len(re.split(r"\s+", text)), "prefix_token_id": ids[0], "max_length": T + 2,
            "include_path": str(out.resolve())}
    (out / "val_task.json").write_text(json.dumps(meta, indent=2))
    return meta


def harness_model_args(meta: dict[str, Any]) -> str:
    """The ``--model_args`` entries of ``local-completions`` that make the harness' windows the run's."""
    return f"max_length={meta['max_length']},custom_prefix_token_id={meta['prefix_token_id']},tokenized_requests=True"


def val_loss_from_bits_per_byte(bits_per_byte: float, meta: dict[str, Any]) -> float:
    """The mean next-token loss (nats) the harness' ``bits_per_byte`` on the task of ``meta`` stands for."""
    return bits_per_byte * meta["bytes"] * math.log(2) / meta["tokens"]
