"""PAINT's CLS->patch attention read from vLLM's own vision tower pass, in its worker.

vLLM's model runner runs a LLaVA's CLIP tower in _execute_mm_encoder, before the step's forward,
and keeps each image's features in its encoder cache under the image's hash
(MultiModalFeatureSpec.identifier): a later request with the same image skips the tower. Hooks
on the attention op of the two encoder layers PAINT reads (attention/paint.py paint_layers)
record, per image of an encoder batch, the head-mean CLS->patch attention (cls_patch_attention:
the CLS query row only). The rows are kept under the image's hash for as long as the encoder
cache holds its features, so a request served from that cache finds them too. The step planner
(worker.py) resolves a request's PAINT keys from them at its prefill, at the image placeholder
positions vLLM assigned, with the selection the transformers engine uses (resolve_paint_keys).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch

from ...attention.paint import cls_patch_attention, paint_layers, resolve_paint_keys
from ...attention.plan import RequestPlan

log = logging.getLogger("attnserve.engines.vllm.tower_captures")


class TowerCaptures:
    """Each encoded image's CLS->patch attention, (first layer row, penultimate layer row)
    (patches,) each, on the tower's device, by the image's hash."""

    def __init__(self, attention_ops: Sequence[torch.nn.Module]):
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: Per hooked layer, the rows of the encoder calls of the running encoder batch.
        self._recording: tuple[list[torch.Tensor], ...] | None = None
        for slot, op in enumerate(attention_ops):
            op.register_forward_pre_hook(functools.partial(self._record, slot))

    @classmethod
    def of_model(cls, model) -> TowerCaptures | None:
        """Hooks on a LLaVA-family model's CLIP tower as vLLM builds it; None for a model
        without one, or whose tower stops before PAINT's penultimate layer (vLLM builds it up to
        the feature layer only)."""
        tower = getattr(getattr(model, "vision_tower", None), "vision_model", None)
        if tower is None:
            return None
        layers = tower.encoder.layers
        first, penultimate = paint_layers(tower.config.num_hidden_layers)
        if penultimate >= len(layers):
            log.warning(
                "the vision tower stops before layer %d: PAINT's tokens cannot be chosen", penultimate
            )
            return None
        return cls([layers[first].self_attn.attn, layers[penultimate].self_attn.attn])

    def _record(self, slot: int, op, args) -> None:
        if self._recording is None:  # vLLM's profiling and warm-up runs
            return
        query, key = args[0], args[1]  # (images, 1 + patches, heads * head_dim), CLS first
        query = query.unflatten(-1, (op.num_heads, op.head_size)).transpose(1, 2)
        key = key.unflatten(-1, (op.num_kv_heads, op.head_size)).transpose(1, 2)
        self._recording[slot].append(cls_patch_attention(query, key, op.scale))

    def record(self, runner, scheduler_output, encode: Callable[[], list]) -> list:
        """encode() (the runner's encoder pass for this step) with its images' rows recorded."""
        if len(self._rows) > len(runner.encoder_cache):  # evicted with the encoder cache
            self._rows = {h: rows for h, rows in self._rows.items() if h in runner.encoder_cache}
        if not scheduler_output.scheduled_encoder_inputs:
            return encode()
        # vLLM encodes the step's items in this order (grouped by modality).
        hashes, items, _ = runner._batch_mm_inputs_from_scheduler(scheduler_output)
        images = [h for h, (modality, _) in zip(hashes, items) if modality == "image"]
        self._recording = ([], [])
        try:
            outputs = encode()
            first, penultimate = (torch.cat(rows) if rows else None for rows in self._recording)
        finally:
            self._recording = None
        if first is None or penultimate is None or not len(first) == len(penultimate) == len(images):
            log.warning("the vision tower's attention was not seen for this step's %d images", len(images))
            return outputs
        for i, image in enumerate(images):
            self._rows[image] = (first[i], penultimate[i])
        return outputs

    def resolve(self, plan: RequestPlan, mm_features: Sequence) -> RequestPlan:
        """plan with PAINT's tokens chosen for a request's images (its mm_features, in prompt
        order), from their recorded rows."""
        images = [feature for feature in mm_features if feature.modality == "image"]
        missing = [feature.identifier for feature in images if feature.identifier not in self._rows]
        if missing:
            raise RuntimeError(f"no vision tower attention recorded for images {missing}")
        rows = [self._rows[feature.identifier] for feature in images]
        first, penultimate = (torch.stack(layer).float().cpu() for layer in zip(*rows))
        spans = [(f.mm_position.offset, f.mm_position.offset + f.mm_position.length) for f in images]
        return resolve_paint_keys(plan, spans, first, penultimate)
