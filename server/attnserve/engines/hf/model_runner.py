"""Run the model's forwards over the running batch's KV cache, each row under its attention plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from ...attention.layout import RowLayout
from ...attention.plan import RowPlan
from ...attention.readout import LayerStatistics, RowReadout
from ...readouts import CallSite
from ..base import ScoreRequest
from ..readouts import StatisticsSampler
from . import attention
from .kv_batch import KVBatch
from .requests import RequestRow
from .scoring import AnswerQuery, score_answers
from .vision import VisionTower, encode_batch

#: (layer, statistics of one row in one call): feeds the attention-statistics metrics.
StatisticsSink = Callable[[int, LayerStatistics], None]


class ModelRunner:
    """Own the model and the running batch's KV cache; turn rows into forwards and logits.

    Prefill and decode return (rows, vocab) float32 logits on the CPU, one row per given row, and
    record each row's attention readouts into its step_readouts on the way.
    """

    def __init__(
        self,
        model,
        *,
        device: torch.device,
        pad_id: int,
        max_batch_size: int,
        statistics_sample_rate: float,
        on_statistics: StatisticsSink | None,
        vision_tower: VisionTower | None = None,
    ):
        self.model = model
        self._vision_tower = vision_tower
        self._device = device
        self._pad_id = pad_id
        self._max_batch_size = max_batch_size
        self._sampler = StatisticsSampler(statistics_sample_rate)
        self._on_statistics = on_statistics
        self._kv: KVBatch | None = None

    def prefill(self, rows: list[RequestRow]) -> torch.Tensor:
        """The rows' prompts, left-padded, in one forward; their KV joins the batch's after the
        rows already in it."""
        lengths = [len(r.request.prompt_token_ids) for r in rows]
        width = max(lengths)
        input_ids = torch.tensor(
            [[self._pad_id] * (width - n) + list(r.request.prompt_token_ids) for r, n in zip(rows, lengths)],
            device=self._device,
        )
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        for row, n in zip(rows, lengths):
            row.length = n
        images, plans = encode_batch(
            self._vision_tower, [(r.request.images, r.request.image_spans, r.request.plan) for r in rows]
        )
        for row, plan in zip(rows, plans):  # PAINT's keys are chosen once, at prefill
            if plan is not row.request.plan:
                row.request = dataclasses.replace(row.request, plan=plan)
        logits = self._forward(rows, input_ids, mask, positions, cache, width, images)
        new = KVBatch(cache, mask)
        if self._kv is None:
            self._kv = new
        else:
            self._kv.merge(new)
        return logits

    def decode(self, rows: list[RequestRow]) -> torch.Tensor:
        """One token for every row of the running batch (rows in the KV batch's order)."""
        input_ids = torch.tensor([[r.last_token] for r in rows], device=self._device)
        positions = torch.tensor([[r.length] for r in rows], device=self._device)
        for row in rows:
            row.length += 1
        self._kv.extend_mask()
        return self._forward(rows, input_ids, self._kv.mask, positions, self._kv.cache, self._kv.length)

    def keep_rows(self, kept: list[int]) -> None:
        """Keep only these rows of the KV batch, in this order (none: drop the cache)."""
        if not kept:
            self._kv = None
        else:
            self._kv.keep_rows(kept)

    def clear(self) -> None:
        """Drop the KV batch (its step failed)."""
        self._kv = None

    def score(self, request: ScoreRequest) -> list[float]:
        """Each candidate's summed log-probability, in forwards of their own (no KV cache)."""
        queries = [
            AnswerQuery(
                request.prompt_token_ids, candidate, request.plan, request.images, request.image_spans
            )
            for candidate in request.candidate_token_ids
        ]
        return score_answers(
            self.model,
            queries,
            pad_id=self._pad_id,
            batch_size=self._max_batch_size,
            vision_tower=self._vision_tower,
        )

    def _forward(self, rows, input_ids, mask, positions, cache, key_length, images=None) -> torch.Tensor:
        batch = self._batch_attention(rows, key_length)
        # A text-only model's forward takes no mm_encoder_outputs (its kwargs reach attention).
        extra = {} if images is None else {"mm_encoder_outputs": images}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            attnserve_batch=batch,
            **extra,
        )
        return out.logits[:, -1].float().cpu()  # sampling runs on the CPU with per-request generators

    def _batch_attention(self, rows: list[RequestRow], key_length: int) -> attention.BatchAttention | None:
        sampled_row = self._sampler.sampled_row(len(rows))
        if sampled_row < 0 and not any(r.request.plan.touches_attention for r in rows):
            return None  # nothing to do in attention: plain SDPA, no overhead

        def plan_for(row: int, layer: int) -> RowPlan | None:
            r = rows[row]
            return r.request.plan.for_call(layer, r.step, row == sampled_row)

        def on_readouts(layer: int, batch_rows: Sequence[int], readouts: Sequence[RowReadout | None]) -> None:
            for row, readout in zip(batch_rows, readouts):
                if readout is not None:
                    self._record(rows[row], layer, readout, row == sampled_row)

        layouts = [
            RowLayout(key_start=key_length - r.length, num_prompt_tokens=len(r.request.prompt_token_ids))
            for r in rows
        ]
        return attention.BatchAttention(layouts, plan_for, on_readouts)

    def _record(self, row: RequestRow, layer: int, readout: RowReadout, sampled: bool) -> None:
        if sampled and readout.statistics is not None and self._on_statistics is not None:
            self._on_statistics(layer, readout.statistics)
        row.step_readouts.add(row.request.plan, CallSite(layer, row.step, row.length - 1), readout)
