"""Importable models, loaders and worker scripts for the recalibration tests."""
