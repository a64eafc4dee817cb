"""Deconstructing Attention (arXiv 2510.11602): attention variants x uniform / hybrid / hybrid-skip layouts."""
