"""The channels-last GEMM feature extractor equals the conv1d formulation it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peace_audio.adapter import AudioBatchError, FeatureExtractor

LAYER_SETS = [
    [(16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 2, 2), (16, 2, 2)],  # the official shape, narrow
    [(6, 7, 3), (5, 1, 2), (4, 3, 3), (3, 4, 1)],  # kernel < stride, kernel == stride, stride 1
]


def conv1d_reference(extractor: FeatureExtractor, waveform: torch.Tensor) -> torch.Tensor:
    """Conv1d -> LayerNorm over channels -> GELU, channels first, as torch's modules compute it."""
    x = waveform.unsqueeze(1)
    for layer in extractor.layers:
        x = F.conv1d(x, layer.conv.weight, stride=layer.stride)
        x = F.gelu(layer.norm(x.transpose(1, 2)).transpose(1, 2))
    return x.transpose(1, 2)


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_gemm_extractor_matches_conv1d_values_and_gradients(layers):
    torch.manual_seed(0)
    extractor = FeatureExtractor(layers, eps=1e-5)
    for layer in extractor.layers:  # non-trivial norm parameters
        torch.nn.init.normal_(layer.norm.weight, 1.0, 0.2)
        torch.nn.init.normal_(layer.norm.bias, 0.0, 0.2)
    waveform = torch.randn(3, 1601)

    produced = extractor(waveform)
    expected = conv1d_reference(extractor, waveform)
    assert produced.shape == expected.shape
    torch.testing.assert_close(produced, expected, atol=1e-5, rtol=1e-5)

    weights = [layer.conv.weight for layer in extractor.layers]
    grads = torch.autograd.grad(produced.square().sum(), weights)
    reference = torch.autograd.grad(expected.square().sum(), weights)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    plain = FeatureExtractor(LAYER_SETS[0], eps=1e-5)
    recomputed = FeatureExtractor(LAYER_SETS[0], eps=1e-5, checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    waveform = torch.randn(2, 2000, requires_grad=True)
    grads = []
    for extractor in (plain, recomputed):
        extractor.train()
        loss = extractor(waveform).tanh().sum()
        grads.append(torch.autograd.grad(loss, [waveform, *extractor.parameters()]))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_input_shorter_than_a_kernel_is_a_clear_error():
    extractor = FeatureExtractor(LAYER_SETS[0], eps=1e-5)
    with pytest.raises(AudioBatchError, match=r"fewer than a conv layer's kernel \(10\)"):
        extractor(torch.randn(1, 9))
