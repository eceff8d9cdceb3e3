"""Without torchvision, transformers' torchvision-based image processors cannot be imported, yet
vLLM's LLaVA module imports pixtral's at module level. This redirects an import of
`transformers.models.<m>.image_processing_<m>` to its PIL sibling `image_processing_pil_<m>`
(the same helpers) when torchvision is missing. Installed by the plugin in every vLLM process."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import re
import sys

_TORCHVISION_PROCESSOR = re.compile(r"^transformers\.models\.(\w+)\.image_processing_(\w+)$")


class _PilProcessorRedirect(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        match = _TORCHVISION_PROCESSOR.match(name)
        if match is None or match.group(2).startswith("pil_") or match.group(1) != match.group(2):
            return None
        pil_name = f"transformers.models.{match.group(1)}.image_processing_pil_{match.group(2)}"
        if importlib.util.find_spec(pil_name) is None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        module, _, model = spec.name.rpartition(".image_processing_")
        return importlib.import_module(f"{module}.image_processing_pil_{model}")

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Idempotent; does nothing when torchvision is importable."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    if not any(isinstance(finder, _PilProcessorRedirect) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PilProcessorRedirect())
