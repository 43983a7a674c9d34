"""peace-imu: the ``imu`` modality (accelerometer + gyroscope windows) for peace.

Kept empty on purpose: peace imports ``peace_imu.plugin`` to discover the plugin, and that import
must stay cheap (no torch, no numpy).
"""
