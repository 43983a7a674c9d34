"""The registry's conformance suite, run against the installed plugin (found by its entry point)."""

from __future__ import annotations

import torch
from peace_registry.conformance import ModalityConformance

torch.set_num_threads(1)


class TestImuConformance(ModalityConformance):
    modality = "imu"
