"""A user model importable as ``tests.user_models:tiny_net`` (for the pkg.module:factory path)."""

import torch.nn as nn


def tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


NOT_A_FACTORY = 3


def fixed_size_net():
    """Runs on 3x32x32 only (its classifier reads a flattened 8x8x8 map)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def pretrained_tiny_net():
    """A pretrained factory: seeded weights, and its own input spec as attributes."""
    import torch

    torch.manual_seed(0)
    model = tiny_net()
    model.input_size = (3, 16, 16)
    model.mean = (0.5, 0.5, 0.5)
    model.std = (0.25, 0.25, 0.25)
    return model


class _Underscored(nn.Module):
    """Layer names that start with "_", as EfficientNet's do (``_blocks.0._expand_conv``)."""

    def __init__(self):
        super().__init__()
        self._stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU())
        self._body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(16), nn.ReLU())
        self._fc = nn.Linear(16, 10)

    def forward(self, x):
        return self._fc(self._body(self._stem(x)).mean(dim=(2, 3)))


def underscored_net():
    import torch

    torch.manual_seed(0)
    return _Underscored()


def plain_net():
    """No BatchNorm (nothing to synthesise images from): seeded weights, 16x16 inputs."""
    import torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.input_size = (3, 16, 16)
    return model


class SmallCNN(nn.Module):
    """A user's own CNN (not from the zoo), built without arguments: what ``autodfp.prune``
    and ``autodfp.search`` take as an object. BN statistics are seeded away from the
    identity so that synthetic images have something to match."""

    def __init__(self):
        import torch

        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, 10)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                        * (2.0 / module.weight[0].numel()) ** 0.5)
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.copy_(torch.rand(module.num_features,
                                                         generator=generator) - 0.5)
                    module.running_var.copy_(torch.rand(module.num_features,
                                                        generator=generator) + 0.5)

    def forward(self, x):
        return self.classifier(self.features(x))


class NeedsArguments(SmallCNN):
    def __init__(self, width: int):
        super().__init__()


class ViewNet(SmallCNN):
    """Flattens a 16x16 conv output with ``.view``, which a channels-last tensor refuses."""

    def __init__(self):
        super().__init__()
        import torch

        self.features = self.features[:-2]
        self.classifier = nn.Linear(32 * 16 * 16, 10)
        with torch.no_grad():  # seeded, as the factory's weights must be the same every call
            self.classifier.weight.copy_(torch.randn(10, 32 * 16 * 16, generator=torch.Generator()
                                                     .manual_seed(1)) * 0.01)
            self.classifier.bias.zero_()

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))
