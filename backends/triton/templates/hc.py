"""Triton templates: see the package docstring (backends/triton/templates/__init__.py)."""
