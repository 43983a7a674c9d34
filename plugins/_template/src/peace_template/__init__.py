"""peace-template: the ``signal`` modality (fixed-channel 1-D signals) for peace.

Kept empty on purpose: peace imports ``peace_template.plugin`` to discover the plugin, and that
import must stay cheap (no torch).
"""
