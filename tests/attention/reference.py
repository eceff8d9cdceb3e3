"""Eager reference for attention.core, written straight from the methods' formulas.

Everything is materialised per row and head in float64: the logit matrix, the softmax, each
method applied literally to the matrix (ACT's p' rule, PASTA's multiply-and-renormalise, PAINT's
s + a|s|, SoftPAG's (1-u)P + uI), then o = P V. Slow on purpose, shares no code with core.

Layouts, from their definitions: self-attention query rows are the last tokens of the key
sequence, cross-attention query rows query_start.. have no position among the keys. A query at
position t sees key j when j <= t (causal), always (full), block_ids[j] <= block_ids[t] (block).
Sink statistics (token 0, tokens 0..3, hidden sinks) are kept for causal and block rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from attnserve.attention.layout import MaskKind, RowLayout
from attnserve.attention.plan import (
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    KeySet,
    LogitRescale,
    RowPlan,
    ScopedOp,
    SinkCalibration,
    Temperature,
)
from attnserve.attention.readout import LayerStatistics


def key_selected(keys: KeySet, position: int, num_prompt_tokens: int) -> bool:
    if position >= num_prompt_tokens:
        return keys.include_generated
    inside = any(start <= position < end for start, end in keys.ranges) if keys.ranges else True
    return inside != keys.invert


@dataclass
class RefReadout:
    statistics: LayerStatistics | None
    #: (H, n): the last query's final probabilities, every head.
    last_query_rows: torch.Tensor | None


def _sees(layout: RowLayout, query_position: int | None, key: int) -> bool:
    if layout.mask is MaskKind.FULL:
        return True
    if layout.mask is MaskKind.BLOCK:
        return layout.block_ids[key] <= layout.block_ids[query_position]
    return key <= query_position


def _query_in_scope(scoped: ScopedOp, query: int, queries: list[int]) -> bool:
    """Whether the op acts on batch query row `query`; its query rows count the row's valid
    queries from 0."""
    index = query - queries[0]
    rows = scoped.query_rows
    inside = any(start <= index < end for start, end in rows.ranges) if rows.ranges else True
    if inside == rows.invert:
        return False
    return not scoped.last_query_only or query == queries[-1]


def _acts(scoped: ScopedOp, head: int, query: int, queries: list[int]) -> bool:
    if scoped.op.is_identity:
        return False
    if scoped.heads is not None and head not in scoped.heads:
        return False
    return _query_in_scope(scoped, query, queries)


def reference_attend(q, k, v, *, scale, layouts: list[RowLayout], plans: list[RowPlan]):
    """Returns (output (B, H, Lq, D) float64 with padded query rows zero, readouts)."""
    batch, num_heads, num_queries, _ = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    readouts = []
    for b in range(batch):
        layout = layouts[b]
        start = layout.key_start
        prompt = layout.num_prompt_tokens
        n = num_keys - start
        # Valid query rows and their token positions (None: a cross-attention query has none).
        if layout.cross_attention:
            queries = list(range(layout.query_start, num_queries))
            qpos = dict.fromkeys(queries)
        else:
            queries = [i for i in range(num_queries) if num_keys - num_queries + i >= start]
            qpos = {i: num_keys - num_queries + i - start for i in queries}
        sees = {i: [_sees(layout, qpos[i], j) for j in range(n)] for i in queries}
        last = queries[-1]
        ops = plans[b].ops
        finals = []
        for h in range(num_heads):
            kv = h // group
            qh = q[b, h].double()
            kh = k[b, kv, start:].double()
            vh = v[b, kv, start:].double()
            logits = scale * qh @ kh.T  # (Lq, n), key j is position j
            probs = torch.zeros(num_queries, n, dtype=torch.float64)
            for i in queries:
                p = qpos[i]
                row = logits[i].clone()
                for scoped in ops:
                    if isinstance(scoped.op, Temperature) and _acts(scoped, h, i, queries):
                        for j in range(n):
                            if key_selected(scoped.keys, j, prompt):
                                row[j] = row[j] / scoped.op.temperature
                tempered = row.clone()
                for scoped in ops:
                    if isinstance(scoped.op, LogitRescale) and _acts(scoped, h, i, queries):
                        for j in range(n):
                            if key_selected(scoped.keys, j, prompt):
                                tempered[j] = tempered[j] + scoped.op.alpha * abs(tempered[j])
                final = tempered.clone()
                for scoped in ops:
                    if isinstance(scoped.op, KeyEmphasis) and _acts(scoped, h, i, queries):
                        for j in range(n):
                            if key_selected(scoped.keys, j, prompt):
                                final[j] = final[j] + (
                                    math.log(scoped.op.alpha) if scoped.op.alpha > 0 else -math.inf
                                )
                    if isinstance(scoped.op, KeyMask) and _acts(scoped, h, i, queries):
                        for j in range(n):
                            if j != p and key_selected(scoped.keys, j, prompt):
                                final[j] = -math.inf
                for j in range(n):
                    if not sees[i][j]:
                        final[j] = -math.inf
                probs[i] = torch.softmax(final, dim=0)

            for scoped in ops:
                if not isinstance(scoped.op, SinkCalibration) or scoped.op.is_identity:
                    continue
                if scoped.heads is not None and h not in scoped.heads:
                    continue
                op = scoped.op
                sinks = []
                for j in range(1, n):
                    seers = [i for i in queries if sees[i][j]]
                    if not seers or not key_selected(scoped.keys, j, prompt):
                        continue
                    if op.min_queries > 0 and len(seers) < op.min_queries:
                        continue
                    if sum(float(probs[i, j]) for i in seers) / len(seers) > op.tau:
                        sinks.append(j)
                for i in queries:
                    if not _query_in_scope(scoped, i, queries):
                        continue
                    m = sum(float(probs[i, j]) for j in sinks)
                    if m <= 0 or m >= 1:
                        continue
                    for j in range(n):
                        if j in sinks:
                            probs[i, j] = op.beta * probs[i, j]
                        else:
                            probs[i, j] = probs[i, j] * (1 - op.beta * m) / (1 - m)

            for scoped in ops:
                if isinstance(scoped.op, IdentityBlend):
                    assert not layout.cross_attention, "no own key to blend towards"
                    u = scoped.op.weight
                    for i in queries:
                        if _acts(scoped, h, i, queries):
                            identity_row = torch.zeros(n, dtype=torch.float64)
                            identity_row[qpos[i]] = 1.0
                            probs[i] = (1 - u) * probs[i] + u * identity_row
            o = probs @ vh
            for scoped in ops:
                if isinstance(scoped.op, HeadOutputScale):
                    for i in queries:
                        if _acts(scoped, h, i, queries):
                            o[i] = o[i] * scoped.op.scale
            for i in queries:
                out[b, h, i] = o[i]
            finals.append(probs)
        readouts.append(_readout(plans[b], layout, finals, queries, sees, n, prompt, last))
    return out, readouts


def _image_statistics(spans, finals, queries, sees, n, prompt) -> dict:
    """Over the queries that see an image key: the mass on the image keys, and the entropy of
    the attention over them renormalised to sum to 1, over ln(image keys seen)."""
    if not spans:
        return {}
    image = [j for j in range(min(prompt, n)) if any(a <= j < z for a, z in spans)]
    count, mass, entropy = 0, 0.0, 0.0
    for i in queries:
        seen = [j for j in image if sees[i][j]]
        if not seen:
            continue
        count += 1
        for probs in finals:
            weights = [float(probs[i, j]) for j in seen]
            total = sum(weights)
            mass += total / len(finals)
            if total > 0 and len(seen) > 1:
                h = -sum(w / total * math.log(w / total) for w in weights if w > 0)
                entropy += h / math.log(len(seen)) / len(finals)
    return {"image_query_count": count, "image_mass": mass, "image_entropy": entropy}


def _readout(plan: RowPlan, layout: RowLayout, finals, queries, sees, n, prompt, last) -> RefReadout | None:
    needs = plan.needs
    if needs.is_empty:
        return None
    num_heads = len(finals)
    statistics = None
    if needs.statistics:
        entropy = normalized = sink = first4 = 0.0
        ranges = [0.0] * len(needs.mass_ranges)
        for i in queries:
            visible = sum(sees[i])
            for probs in finals:
                row = probs[i]
                h_i = float(-sum(x * math.log(x) for x in row.tolist() if x > 0))
                entropy += h_i / num_heads
                normalized += (h_i / math.log(visible) if visible > 1 else 0.0) / num_heads
                sink += float(row[0]) / num_heads
                first4 += float(row[:4].sum()) / num_heads
                for r, (a, z) in enumerate(needs.mass_ranges):
                    ranges[r] += float(row[a : min(z, prompt, n)].sum()) / num_heads
        hidden = 0.0
        for probs in finals:
            for j in range(1, n):
                seers = [i for i in queries if sees[i][j]]
                if seers and sum(float(probs[i, j]) for i in seers) / len(seers) > 0.1:
                    hidden += 1 / num_heads
        sinks_apply = layout.mask is not MaskKind.FULL
        image = _image_statistics(needs.image_keys, finals, queries, sees, n, prompt)
        statistics = LayerStatistics(
            query_count=len(queries),
            entropy=entropy,
            normalized_entropy=normalized,
            sink_mass=sink if sinks_apply else None,
            sink_mass_first4=first4 if sinks_apply else None,
            hidden_sinks=hidden * len(queries) if sinks_apply else None,
            range_mass=ranges,
            **image,
        )
    rows = None
    if needs.last_query_rows:  # the last query sees every key
        rows = torch.stack([probs[last] for probs in finals])
    return RefReadout(statistics, rows)
