"""Small utilities every layer may use; kernels/ is the bottom layer, so kernels/, archs/, train/ and compare/ can.

  files.py       atomic writes: a crash or a concurrent reader never sees half a file
  provenance.py  the checkout's git commit, for results to name the code they came from
  markdown.py    Markdown tables as every report here writes them
  timing.py      wall-clock seconds that include the device's queued work
  plotting.py    pyplot on the Agg backend with the house style, figures as PNG bytes
  schedule.py    the learning-rate schedule (warmup, then cosine, WSD or constant)
  launch.py      CUDA's grid limits for our Triton launches: every kernel's programs on grid axis 0
  inputs.py      the kernel ops' shared input checks (one device, a float dtype)
  autotune.py    triton.autotune that first prunes the configs whose shared memory does not fit the device
  tiles.py       Triton helpers the ops' kernels share (needs triton: imported by their triton.py only)
"""
