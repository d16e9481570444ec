"""Everything that runs a model (imports torch, lazily): recalibration, drift passes, distributed, launch."""
