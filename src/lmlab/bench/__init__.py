"""Measure: benchmark sweeps against peers and the machine's own roofline.

- ``machine``: the machine's bandwidth and matmul peak, measured once, cached in
  ``$LMLAB_HOME/machine.json``.
- ``runner``: what every engine's runner reports: a ``Trial`` per timed generation, the bytes
  its model stores and reads per decode step.
- ``sweep``: the points of a sweep (dtype × prompt length × batch × new tokens), how each is
  timed, the bytes and FLOPs behind each rate, the memory estimate that refuses a point early.
- ``peers``: HF transformers and llama.cpp on the same weights, timed the same way.
- ``plots``: tokens/s vs batch, memory vs sequence length, the roofline (PNG and SVG).

``lmlab bench`` (``lmlab.cli.bench``) drives them; ``benchmarks/engine_vs_hf.py`` reuses them.
"""

from lmlab.bench.machine import machine_limits, measure_machine
from lmlab.bench.runner import weight_bytes_per_step
from lmlab.bench.sweep import LmlabRunner, ModelShape, SweepSpec, bench_prompts, estimate_memory, measure, run_sweep
from lmlab.host import host_details, lmlab_home

__all__ = [
    "LmlabRunner",
    "ModelShape",
    "SweepSpec",
    "bench_prompts",
    "estimate_memory",
    "host_details",
    "lmlab_home",
    "machine_limits",
    "measure",
    "measure_machine",
    "run_sweep",
    "weight_bytes_per_step",
]
