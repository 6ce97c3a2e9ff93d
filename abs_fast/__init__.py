"""abs-fast: kernel-optimized trainer for Anchored Bipolicy Self-Play (attacker and defender LoRA
adapters over one frozen 4-bit base model)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("abs-fast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
