"""align: post-training alignment for LLMs from one recipe."""

__version__ = "0.1.0"
