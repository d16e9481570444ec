"""Repairs written into checkpoints: averaging ranks, recalibration at checkpoint level."""
