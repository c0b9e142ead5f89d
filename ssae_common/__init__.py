"""ssae_common: the library behind the ssae command-line tools (usable from Python on its own)."""

__version__ = "0.1.0"
