"""The core's own plugin: architecture presets and the official-checkpoint converter."""

PEACE_PLUGIN_API = "1.0"
