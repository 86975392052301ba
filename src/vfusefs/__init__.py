"""vfusefs: one FUSE mount per node presenting every storage host's virtual folders.

Importing the package loads nothing native: the libfuse shim is loaded by `vfusefs serve`
alone, before anything imports pyfuse3 (see fuseshim.py), so CLI calls stay plain Python.
"""

__version__ = "0.1.0"
