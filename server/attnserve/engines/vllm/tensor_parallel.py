"""Tensor parallelism in vLLM's worker: the query heads a worker holds, and the step's readouts
of every worker of its group gathered onto the first.

vLLM's attention layers split the query heads evenly over the tensor-parallel group (the KV
heads too, or copies of them when there are fewer KV heads than workers): worker r holds query
heads [r * local, (r + 1) * local), as local heads 0..local-1. Each worker applies its requests'
plans to its own heads (RequestPlan.for_head_shard) and reads out those; after the forward, the
first worker gathers the readouts (one collective over the group's CPU group, in steps where a
row reads something out) and merges them into global head order (merge_head_shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention.readout import RowReadout, merge_head_shards
from ...readouts import CallSite

#: Each planned row's attention calls that read something out, in call order.
RowCalls = list[list[tuple[CallSite, RowReadout]]]


@dataclass(frozen=True)
class HeadShard:
    rank: int
    world_size: int
    num_local_heads: int

    @property
    def first_head(self) -> int:
        return self.rank * self.num_local_heads


def head_shard(runner) -> HeadShard | None:
    """This worker's share of the query heads; None without tensor parallelism."""
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None
    local_heads = runner.model_config.get_num_attention_heads(runner.parallel_config)
    return HeadShard(group.rank_in_group, group.world_size, local_heads)


def gather_row_calls(calls: RowCalls) -> RowCalls | None:
    """Every worker calls this with its own RowCalls (the same rows and calls, its own heads);
    the first worker gets them merged, the others None."""
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    calls = [[(site, _on_cpu(readout)) for site, readout in row] for row in calls]
    gathered = [None] * group.world_size if group.rank_in_group == 0 else None
    torch.distributed.gather_object(calls, gathered, dst=group.first_rank, group=group.cpu_group)
    if gathered is None:
        return None
    return [
        [(site, merge_head_shards([shard[r][c][1] for shard in gathered])) for c, (site, _) in enumerate(row)]
        for r, row in enumerate(gathered[0])
    ]


def _on_cpu(readout: RowReadout) -> RowReadout:
    # Pickled CUDA tensors would come back on the sending worker's device.
    if readout.last_query_rows is not None and readout.last_query_rows.device.type != "cpu":
        readout.last_query_rows = readout.last_query_rows.cpu()
    return readout
