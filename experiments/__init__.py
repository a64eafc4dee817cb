"""Experiment scripts and studies (see experiments/README.md). Not installed with attnzoo: run from a checkout."""
