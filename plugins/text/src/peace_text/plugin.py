"""Entry module of the text plugin."""

PEACE_PLUGIN_API = "1.0"
