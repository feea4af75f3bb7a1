import torch

from rrm_hub import PixelPreprocess, create_pixel_model


def test_preprocess_normalizes_resizes_and_matches_channels():
    pre = PixelPreprocess((3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1))
    x = torch.rand(2, 1, 28, 28)
    out = pre(x)
    assert out.shape == (2, 3, 32, 32)
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, 2], (resized[:, 0] - 0.3) / 0.1, atol=1e-5)
    gray = PixelPreprocess((1, 28, 28), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert gray(torch.rand(2, 3, 28, 28)).shape == (2, 1, 28, 28)
    assert abs(gray.mean.item() - (0.485 + 0.456 + 0.406) / 3) < 1e-6


def test_pixel_model_takes_unit_pixels_of_any_size():
    model = create_pixel_model("resnet18", 10, (1, 28, 28), {"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)})
    assert model.preprocess.input_size == (1, 28, 28)
    assert model.model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.rand(2, 3, 40, 40)).shape == (2, 10)  # RGB and bigger: converted inside
    x = torch.rand(2, 1, 28, 28)
    manual = model.model((x - model.preprocess.mean) / model.preprocess.std)
    assert torch.allclose(model(x), manual)
