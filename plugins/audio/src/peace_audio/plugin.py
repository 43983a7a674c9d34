"""Entry module of the audio plugin."""

PEACE_PLUGIN_API = "1.0"
