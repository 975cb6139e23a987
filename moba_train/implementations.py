"""Which implementations Megatron-Core runs on (Transformer Engine, Apex, or its PyTorch fallbacks), said
in one line at the start of a run instead of the warnings it prints while it is imported (seven of them,
fourteen lines, repeated by every rank).

    quiet_megatron_fallbacks()   # before anything imports megatron.core
    ...
    print(describe())            # e.g. "Megatron-Core 0.16.1 on PyTorch fallbacks (no Transformer Engine, no
                                 # Apex): optimizer torch.optim.adamw.AdamW, torch norms, local multi-tensor ops"
"""

from __future__ import annotations

import logging
import warnings

_FALLBACK_WARNINGS = (
    r"Transformer Engine and Apex are not installed\. Falling back to",
    r"Apex is not installed\. Falling back to Torch Norm",
    # Megatron-Core 0.16.1's own default cuda_graph_scope ("full") trips its own deprecation warning; no CUDA
    # graphs are captured here.
    r"full scope is deprecated\. Use empty cuda_graph_scope",
)


class _NoCudaRuntimeNotice(logging.Filter):
    """PyTorch's extension builder logs "No CUDA runtime is found, using CUDA_HOME=..." when it is imported on a
    machine with a CUDA toolkit but no GPU; Megatron-Core imports it (megatron.core.nccl_allocator) and nothing
    here builds an extension, so on such machines every rank printed it for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_megatron_fallbacks() -> None:
    """Ignore Megatron-Core's warnings about Transformer Engine and Apex being absent (`describe` says it),
    and PyTorch's no-CUDA-runtime notice that importing Megatron-Core triggers."""
    for message in _FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"megatron\.core\.")
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


def describe() -> str:
    """One line: the Megatron-Core version and the optimizer, norm and multi-tensor implementations in use."""
    import megatron.core
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.models.backends import HAVE_APEX
    from megatron.core.optimizer import Adam, clip_grads

    found = [name for name, present in (("Transformer Engine", HAVE_TE), ("Apex", HAVE_APEX)) if present]
    source = f"with {' and '.join(found)}" if found else "on PyTorch fallbacks (no Transformer Engine, no Apex)"
    l2_norm = clip_grads.l2_norm_impl.__module__
    ops = "local" if l2_norm.startswith("megatron.") else l2_norm.split(".")[0]
    return (f"Megatron-Core {megatron.core.__version__} {source}: optimizer {Adam.__module__}.{Adam.__name__}, "
            f"{'Apex fused' if HAVE_APEX else 'torch'} norms, {ops} multi-tensor ops")
