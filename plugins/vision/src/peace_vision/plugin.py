"""Entry module of the vision plugin."""

PEACE_PLUGIN_API = "1.0"
