"""Readouts as a registry: each module here is one readout (its settings, the stage it reads
from attention.core, its per-step state, how that accumulates and how it is written into the
response; base.py has the contract). Adding a readout is a module, its entry below, its proto
field and its test."""

from __future__ import annotations

from collections.abc import Mapping

from .attention_rows import AttentionRows
from .base import CallSite, Readout, ResponseContext
from .image_attention import ImageAttention
from .layer_statistics import LayerStatisticsReadout
from .scanpath import Scanpath
from .summary import Summary

#: Name (the ReadoutSpec field) -> readout, in the order they are compiled and written.
READOUTS: Mapping[str, Readout] = {
    readout.name: readout
    for readout in (LayerStatisticsReadout(), AttentionRows(), Summary(), ImageAttention(), Scanpath())
}

#: Readouts that read images: only vision-language models list them.
IMAGE_READOUTS = frozenset({ImageAttention.name, Scanpath.name})
#: What a text-only model offers.
TEXT_READOUTS = frozenset(READOUTS) - IMAGE_READOUTS

__all__ = ["IMAGE_READOUTS", "READOUTS", "TEXT_READOUTS", "CallSite", "Readout", "ResponseContext"]
