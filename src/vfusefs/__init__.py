"""vfusefs: one FUSE mount per node presenting every storage host's virtual folders."""

__version__ = "0.1.0"
