"""attnserve's vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM loads it in every one of its processes; it swaps the platform's attention backend for the
attnserve subclass, which installs the runner hook when the worker builds it, and, where
torchvision is missing, redirects transformers' torchvision image processors to their PIL
siblings (pil_processors.py) so that vLLM's LLaVA module imports. Requests
without a plan then pay one global read per attention call. `VLLM_PLUGINS` (an allow-list)
turns it off, e.g. to measure raw vLLM; the redirect alone is the `attnserve-pil-processors`
plugin (VLLM_PLUGINS=attnserve-pil-processors: raw vLLM serving a LLaVA without torchvision).
"""

from __future__ import annotations

PACKAGE = "attnserve.engines.vllm"


def register() -> None:
    from .pil_processors import install

    install()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{PACKAGE}.cpu_backend.AttnserveCPUAttentionBackend")
    elif current_platform.is_cuda():
        register_backend(
            AttentionBackendEnum.FLASH_ATTN, f"{PACKAGE}.flash_backend.AttnserveFlashAttentionBackend"
        )
