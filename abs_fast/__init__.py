"""abs-fast: kernel-optimized trainer for Anchored Bipolicy Self-Play (attacker and defender LoRA
adapters over one frozen 4-bit base model)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("abs-fast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"


def _quiet_bitsandbytes_probe() -> None:
    """bitsandbytes (CPUs with AVX512-BF16) probes for the optional Hugging Face `kernels` package at
    import and warns when it is absent; abs-fast never uses that kernel, so the warning is noise."""
    import logging

    class _DropProbe(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropProbe())


_quiet_bitsandbytes_probe()
