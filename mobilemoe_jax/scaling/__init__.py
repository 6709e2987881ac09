"""On-device scaling: exact accounting and latency of configs (accounting), the MoE loss
law (law), architecture search under budgets (search), training sweeps (sweep).
See docs/scaling.md."""
