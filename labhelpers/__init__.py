"""labhelpers: the real code behind the SFT Labs notebooks.

Notebooks stay thin and call into this package; every module here is tested by pytest on its own.
"""

__version__ = "0.1.0"

import warnings as _warnings

# transformers 5 announces renames for v6 (gradient_checkpointing -> activation_checkpointing) from
# inside peft and TRL, where we cannot act on them. They go to stderr, and nbgrader scores a graded
# cell with stderr output as failed, so they are silenced here and nowhere else.
_warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
