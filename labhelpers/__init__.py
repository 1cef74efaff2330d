"""labhelpers: the real code behind the SFT Labs notebooks.

Notebooks stay thin and call into this package; every module here is tested by pytest on its own.
"""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# transformers 5 announces renames for v6 (gradient_checkpointing -> activation_checkpointing) from
# inside peft and TRL, where we cannot act on them. They go to stderr, and nbgrader scores a graded
# cell with stderr output as failed, so they are silenced here and nowhere else.
_warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)


class _DropMessage(_logging.Filter):
    """Drop log records whose message starts with a given text; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes 0.50 on CPUs with AVX512-BF16 tries to fetch an optional gemm kernel from a model hub
# when it is imported, and logs a warning when it cannot (always, offline). Its own kernels are used
# instead and results are unchanged (STACK.md), so students do not see it; other warnings still pass.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))

# Without a GPU, the first training run imports deepspeed (accelerate's model unwrapping checks for its
# engine) and DeepSpeed announces that it falls back to the CPU, in the middle of the cell's output. On a
# CPU that is the expected case, so students do not see it; every other DeepSpeed message still passes.
_logging.getLogger("DeepSpeed").addFilter(_DropMessage("Setting accelerator to CPU"))
