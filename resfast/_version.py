"""The package version, as in pyproject.toml; a module of its own so that the lower layers
(the autotune cache keys) read it without importing the package's face."""
__version__ = "0.1.0"
