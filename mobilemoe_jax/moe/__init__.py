"""Mixture-of-Experts: routing, expert dispatch (reference, fast, expert-parallel), the layer."""
