import pytest
import timm
import torch

from rrm_hub import FeatureTap, RRMError, default_layer, list_layers
from rrm_hub.models.features import feature_width, pool


def _cnn():
    return timm.create_model("resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 16, 24), num_classes=5).eval()


def _vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=2, num_classes=5).eval()


def test_default_layer_is_the_penultimate_representation_cnn_and_vit():
    x = torch.rand(3, 3, 32, 32)
    for model in (_cnn(), _vit()):
        with torch.no_grad(), FeatureTap(model, None) as tap:
            model(x)
            features = tap.pop()
            expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert tap.layer == default_layer(model) and tap.layer.endswith("@input")
        assert torch.allclose(features, expected, atol=1e-6)


def test_named_layers_are_pooled_to_vectors():
    x = torch.rand(2, 3, 32, 32)
    cnn, vit = _cnn(), _vit()
    with FeatureTap(cnn, "layer3") as tap:
        cnn(x)
        assert tap.pop().shape == (2, 16)
    with FeatureTap(vit, "blocks.1") as tap:  # (B, N, D) tokens, class token included
        vit(x)
        assert tap.pop().shape == (2, 48)
    assert pool(torch.ones(2, 5, 7)).shape == (2, 7) and pool(torch.ones(2, 4, 3, 3)).shape == (2, 4)
    assert feature_width(cnn, cnn, "layer2", x) == 16


def test_hooks_are_removed_and_reads_clear():
    model = _cnn()
    with FeatureTap(model, "layer4") as tap:
        model(torch.rand(1, 3, 32, 32))
        tap.pop()
        with pytest.raises(RuntimeError, match="not run"):
            tap.pop()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_layer_lists_near_matches():
    with pytest.raises(RRMError, match="no layer 'layer5'.*near matches: .*layer") as info:
        FeatureTap(_cnn(), "layer5")
    assert "\n" not in str(info.value)


def test_list_layers_reports_output_shapes():
    rows = dict((name, shape) for name, _, shape in list_layers(_cnn(), torch.rand(1, 3, 32, 32)))
    assert rows["layer1"] == (1, 8, 8, 8) and rows["fc"] == (1, 5)
