"""`triton.autotune` that first drops the configs whose shared memory does not fit the GPU at hand.

Shared memory per block differs threefold between GPUs triton targets (99 KB on sm_86/89/120, 163 KB on sm_80,
227 KB on sm_90/100), so one config list cannot fit them all. Before the autotuner benchmarks, each config is
compiled for the current device (the compile the autotuner needs anyway: triton caches it) and kept only if
its shared memory fits; a device where none fits gets one error line instead of a failed launch.
kernels/compile_matrix.py records, per target, what this keeps (compare/results/compile-matrix-*.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import triton

# Shared memory a block may opt in to, in bytes, per compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"): what the compile matrix judges each target's configs by.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
                       120: 101376, 121: 101376}


def fits(shared_bytes: int, limit: int) -> bool:
    return shared_bytes <= limit


def fitting_configs(configs: Sequence[triton.Config], shared_bytes: Callable[[triton.Config], int], limit: int,
                    kernel_name: str) -> list[triton.Config]:
    """The configs whose shared memory fits `limit` bytes, in their order; an error if none does."""
    needs = {config: shared_bytes(config) for config in configs}
    kept = [config for config in configs if fits(needs[config], limit)]
    if not kept:
        raise RuntimeError(f"triton kernel {kernel_name}: no autotune config fits this GPU's {limit} bytes of shared "
                           f"memory per block (the smallest needs {min(needs.values())}); choose another backend "
                           "for its op, e.g. kernels.<op>=torch")
    return kept


def _device_shared_memory_limit() -> int:
    from triton.runtime import driver

    device = driver.active.get_current_device()
    return driver.active.utils.get_device_properties(device)["max_shared_mem"]


def autotune(configs: Sequence[triton.Config], key: list[str]) -> Callable:
    """Decorates a @triton.jit kernel like `triton.autotune(configs, key=key)`, pruning by shared memory."""
    def decorate(kernel):
        def prune(candidates, named_args, **launch_kwargs):
            # launch_kwargs also carries the launch's grid/warmup; only the kernel's own arguments compile
            constexprs = {name: value for name, value in launch_kwargs.items() if name in kernel.arg_names}

            def shared_bytes(config: triton.Config) -> int:
                compiled = kernel.warmup(**named_args, **constexprs, **config.all_kwargs(), grid=(1,))
                return compiled.metadata.shared

            return fitting_configs(candidates, shared_bytes, _device_shared_memory_limit(), kernel.__name__)

        return triton.autotune(list(configs), key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    return decorate
