"""The package version, in a module of its own so that any module can import it without the package's
`__init__` (which imports most modules: importing it from one of them made an import cycle)."""

__version__ = "0.1.0"
