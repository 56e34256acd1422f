"""align: post-training alignment for LLMs from one recipe."""

__version__ = "0.1.0"

from align.quiet import silence_bitsandbytes_kernel_download as _quiet_bnb

_quiet_bnb()  # before anything imports bitsandbytes: its optional-kernel warning is expected offline (align/quiet.py)
