"""Kernel ops, one package each; importing this package registers every shipped op (kernels/registry.py)."""
# Registration order is the order of the `kernels:` config keys.
from archlab.kernels import attention  # noqa: F401
from archlab.kernels import selective_scan  # noqa: F401
from archlab.kernels import causal_conv1d  # noqa: F401
from archlab.kernels import ssd  # noqa: F401
from archlab.kernels import gated_delta  # noqa: F401
