"""Shared plumbing for the example scripts: data, model presets, metrics and reporting.

The techniques themselves live in the scripts; this package holds only what every
script needs and nobody wants to read twice.
"""
