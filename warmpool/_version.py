"""The version, written once: the package, ``--version`` and the build (pyproject) read it here."""

__version__ = "0.2.0"
