"""Audits that read checkpoints and build Reports: inspect, compare, baselines."""
