"""Gated attention vs its baseline: first-token attention share (sinks), max activations and gate means per layer."""
