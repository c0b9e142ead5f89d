"""The ssae command-line tools (installed as the `ssae_tools` package)."""
