"""Building blocks. Importing this package registers the shipped sequence mixers (archs/layers/mixer.py)."""
from archlab.archs.layers import attention, mamba  # noqa: F401 - each registers its mixer
