"""Placeholder until this feature lands."""

NODES = []
