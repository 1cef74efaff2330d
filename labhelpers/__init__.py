"""labhelpers: the real code behind the SFT Labs notebooks.

Notebooks stay thin and call into this package; every module here is tested by pytest on its own.
"""

__version__ = "0.1.0"
