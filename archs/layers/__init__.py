"""Building blocks. Importing this package registers the shipped sequence mixers (archs/layers/mixer.py)."""
from archlab.archs.layers import attention, gated_deltanet, mamba, mamba2  # noqa: F401 - each registers its mixer
