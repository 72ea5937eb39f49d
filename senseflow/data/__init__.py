"""Datasets and data loaders."""
