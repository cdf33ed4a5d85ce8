"""A state_dict saved by the seed's code (its bugs fixed so it runs) loads strictly into torch_ref, same outputs.

`SeedDarknet53` below is the blog post's code with only the fixes listed in docs/architecture.md ("What the
seed's code got wrong"): the 1x1 conv's padding 1 -> 0, `nn.Linaer` -> `nn.Linear`. Its `nn.LeakyReLU()`
(slope 0.01) and `view(-1, 1024)` are kept as written: they are what its checkpoints were trained with.
"""

import io

import pytest
import torch
import torch.nn as nn

import torch_ref
from darknet_arch import SEED_LEAKY_SLOPE


def conv_batch(in_num, out_num, kernel_size=3, padding=1, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_num, out_num, kernel_size=kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_num),
        nn.LeakyReLU(),
    )


class DarkResidualBlock(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        reduced_channels = int(in_channels / 2)
        self.layer1 = conv_batch(in_channels, reduced_channels, kernel_size=1, padding=0)  # fixed: was padding=1
        self.layer2 = conv_batch(reduced_channels, in_channels)

    def forward(self, x):
        residual = x
        out = self.layer1(x)
        out = self.layer2(out)
        out += residual
        return out


class SeedDarknet53(nn.Module):
    def __init__(self, block, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = conv_batch(3, 32)
        self.conv2 = conv_batch(32, 64, stride=2)
        self.residual_block1 = self.make_layer(block, in_channels=64, num_blocks=1)
        self.conv3 = conv_batch(64, 128, stride=2)
        self.residual_block2 = self.make_layer(block, in_channels=128, num_blocks=2)
        self.conv4 = conv_batch(128, 256, stride=2)
        self.residual_block3 = self.make_layer(block, in_channels=256, num_blocks=8)
        self.conv5 = conv_batch(256, 512, stride=2)
        self.residual_block4 = self.make_layer(block, in_channels=512, num_blocks=8)
        self.conv6 = conv_batch(512, 1024, stride=2)
        self.residual_block5 = self.make_layer(block, in_channels=1024, num_blocks=4)
        self.global_avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(1024, self.num_classes)  # fixed: was nn.Linaer

    def forward(self, x):
        out = self.conv1(x)
        out = self.conv2(out)
        out = self.residual_block1(out)
        out = self.conv3(out)
        out = self.residual_block2(out)
        out = self.conv4(out)
        out = self.residual_block3(out)
        out = self.conv5(out)
        out = self.residual_block4(out)
        out = self.conv6(out)
        out = self.residual_block5(out)
        out = self.global_avg_pool(out)
        out = out.view(-1, 1024)
        out = self.fc(out)
        return out

    def make_layer(self, block, in_channels, num_blocks):
        return nn.Sequential(*[block(in_channels) for _ in range(num_blocks)])


def randomize_(model: nn.Module, seed: int) -> None:
    """Random weights and random BN running statistics (variance far from 1), as a trained net has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1234)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 2.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.dim() == 4:  # conv weights, scaled so activations stay O(1) through 52 layers
                fan_in = t.shape[1] * t.shape[2] * t.shape[3]
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("1.weight") else 0.0))


def test_seed_state_dict_loads_strictly_and_gives_same_outputs():
    torch.manual_seed(0)
    seed = SeedDarknet53(DarkResidualBlock, num_classes=18).eval()
    randomize_(seed, 0)
    buf = io.BytesIO()
    torch.save(seed.state_dict(), buf)  # what a user of the seed's code has on disk
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    ours = torch_ref.Darknet53(num_classes=18, leaky_slope=SEED_LEAKY_SLOPE).eval()
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(state), "same keys in the same order"

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = seed(x)
        got = ours(x)
    assert expected.abs().max() > 1e-3, "a degenerate network would make this comparison meaningless"
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_seed_state_dict_with_wrong_class_count_is_refused():
    seed = SeedDarknet53(DarkResidualBlock, num_classes=10)
    ours = torch_ref.Darknet53(num_classes=18)
    with pytest.raises(RuntimeError, match=r"fc\.weight"):
        ours.load_state_dict(seed.state_dict(), strict=True)
