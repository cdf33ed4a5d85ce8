"""Independent references for the porting tests: random weights, a Darknet .weights writer, a float64 forward.

Nothing here imports `porting`: the writer and the numpy forward follow Darknet's layer order and
conventions (docs/darknet-weights.md), so they can catch a wrong key map, transpose or file layout.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from darknet_arch import TINY, DarknetConfig  # noqa: F401  (TINY: re-exported for the tests)

# Darknet's own conventions (docs/darknet-weights.md).
DARKNET_SLOPE = 0.1
BN_EPS = 1e-5  # Darknet's GPU path: (x - mean) / sqrt(var + 1e-5), the convention the port assumes
# Running statistics far from the mean-0 / var-1 defaults that hide BN bugs.
VAR_RANGE = (0.5, 3.0)
MEAN_SCALE = 0.5


def relative_max_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def randomize_torch_state(model, seed: int) -> None:
    """Random conv/fc weights (He-scaled), BN affine and running stats with var in VAR_RANGE, in place."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                value = rng.uniform(*VAR_RANGE, t.shape)
            elif name.endswith("running_mean"):
                value = rng.normal(0.0, MEAN_SCALE, t.shape)
            elif t.ndim == 1 and name.endswith("weight"):  # BN gamma
                value = rng.uniform(0.5, 1.5, t.shape)
            elif t.ndim == 1:  # BN beta, fc bias
                value = rng.normal(0.0, 0.2, t.shape)
            else:
                fan_in = int(np.prod(t.shape[1:]))
                value = rng.normal(0.0, np.sqrt(2.0 / fan_in), t.shape)
            t.copy_(torch.from_numpy(value.astype(np.float32)))


# torch_ref key -> Flax path, written from the naming contract in flax_darknet's docstring, not from porting.
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}  # fmt: skip


def torch_key_to_flax(key: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """('params', 'residual_block3', 'block7', 'layer2', 'conv', 'kernel'), transpose for a torch_ref key."""
    parts = key.split(".")
    if parts[0] == "fc":
        return ("params", "fc", "kernel" if parts[1] == "weight" else "bias"), (1, 0) if parts[1] == "weight" else None
    if re.fullmatch(r"residual_block\d+", parts[0]):
        prefix, rest = (parts[0], f"block{parts[1]}", parts[2]), parts[3:]
    else:
        prefix, rest = (parts[0],), parts[1:]
    if rest[0] == "0":
        return ("params", *prefix, "conv", "kernel"), (2, 3, 1, 0)
    collection, leaf = _BN[rest[1]]
    return (collection, *prefix, "bn", leaf), None


def flax_leaf(variables: dict, path: tuple[str, ...]) -> np.ndarray:
    node = variables
    for name in path:
        node = node[name]
    return np.asarray(node)


# ------------------------------------------------------------------------------------- Darknet, independently


def darknet_layers(config: DarknetConfig, num_classes: int | None, seed: int) -> dict:
    """Random Darknet layers in cfg order: {"stem": conv, "stages": [(down, [(c1, c2), ...])], "head": conv}."""
    rng = np.random.default_rng(seed)

    def conv(cin: int, cout: int, size: int, stride: int) -> dict:
        return {
            "size": size,
            "stride": stride,
            "biases": rng.normal(0.0, 0.2, cout),
            "scales": rng.uniform(0.5, 1.5, cout),
            "rolling_mean": rng.normal(0.0, MEAN_SCALE, cout),
            "rolling_variance": rng.uniform(*VAR_RANGE, cout),
            "weights": rng.normal(0.0, np.sqrt(2.0 / (cin * size * size)), (cout, cin, size, size)),
        }

    layers: dict = {"stem": conv(config.in_channels, config.stem_channels, config.stem_kernel, 1), "stages": []}
    cin = config.stem_channels
    for stage in config.stages:
        c = stage.out_channels
        down = conv(cin, c, config.down_kernel, config.down_stride)
        blocks = [(conv(c, c // 2, 1, 1), conv(c // 2, c, config.block_kernel, 1)) for _ in range(stage.num_blocks)]
        layers["stages"].append((down, blocks))
        cin = c
    if num_classes is not None:
        layers["head"] = {
            "biases": rng.normal(0.0, 0.2, num_classes),
            "weights": rng.normal(0.0, np.sqrt(1.0 / cin), (num_classes, cin, 1, 1)),
        }
    # Round to float32 once, so file, models and the float64 reference all see the same numbers.
    return _to_f32(layers)


def _to_f32(obj):
    if isinstance(obj, dict):
        return {k: _to_f32(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_f32(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float32)
    return obj


def _ordered_convs(layers: dict):
    yield layers["stem"]
    for down, blocks in layers["stages"]:
        yield down
        for c1, c2 in blocks:
            yield c1
            yield c2


def write_weights_file(path, layers: dict, major: int = 0, minor: int = 2, revision: int = 0, seen: int = 0) -> None:
    """Write a Darknet .weights file as darknet's save_weights does (docs/darknet-weights.md)."""
    header = struct.pack("<iii", major, minor, revision)
    long_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    header += struct.pack("<Q", seen) if long_seen else struct.pack("<i", seen)
    chunks = [header]
    for c in _ordered_convs(layers):
        for name in ("biases", "scales", "rolling_mean", "rolling_variance", "weights"):
            chunks.append(np.ascontiguousarray(c[name], dtype="<f4").tobytes())
    if "head" in layers:
        chunks.append(layers["head"]["biases"].astype("<f4").tobytes())
        chunks.append(layers["head"]["weights"].astype("<f4").tobytes())
    with open(path, "wb") as f:
        f.write(b"".join(chunks))


def _conv2d(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """float64 NCHW convolution with Darknet's symmetric padding size // 2."""
    k = w.shape[-1]
    pad = k // 2
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", windows, w, optimize=True)


def _conv_bn_leaky(x: np.ndarray, c: dict) -> np.ndarray:
    # Darknet forward_convolutional_layer: conv (no bias), normalize, scale, add biases, activate.
    out = _conv2d(x, c["weights"].astype(np.float64), c["stride"])
    mean = c["rolling_mean"].astype(np.float64)[None, :, None, None]
    var = c["rolling_variance"].astype(np.float64)[None, :, None, None]
    out = (out - mean) / np.sqrt(var + BN_EPS)
    out = (
        out * c["scales"].astype(np.float64)[None, :, None, None] + c["biases"].astype(np.float64)[None, :, None, None]
    )
    return np.where(out > 0, out, DARKNET_SLOPE * out)


def darknet_forward(layers: dict, x: np.ndarray, feature_stages: tuple[int, ...]) -> tuple[np.ndarray, list]:
    """Darknet's inference in float64, NCHW: (logits or pooled features, [feature maps of feature_stages])."""
    out = _conv_bn_leaky(x.astype(np.float64), layers["stem"])
    features = []
    for i, (down, blocks) in enumerate(layers["stages"]):
        out = _conv_bn_leaky(out, down)
        for c1, c2 in blocks:
            out = out + _conv_bn_leaky(_conv_bn_leaky(out, c1), c2)  # [shortcut] from=-3, linear
        if i in feature_stages:
            features.append(out)
    pooled = out.mean(axis=(2, 3))  # [avgpool]
    if "head" not in layers:
        return pooled, features
    w = layers["head"]["weights"].astype(np.float64)[:, :, 0, 0]
    return pooled @ w.T + layers["head"]["biases"].astype(np.float64), features
