"""BatchNorm folded into the preceding conv for inference: `fold_batchnorm(variables, config)`.

With the running statistics, every ConvBN computes
    y = (conv(x, W) - mean) / sqrt(var + eps) * scale + bias = conv(x, W * s) + (bias - mean * s),
    s = scale / sqrt(var + eps),
so an eval-only network whose convs carry a bias and skip BatchNorm (`Darknet53(..., bn_folded=True)`) gives the
same logits with one fewer per-channel affine and no statistics. The fold is computed in float64 on the host and
cast back to each kernel's dtype. Parameter paths stay those of the unfolded model, minus each `bn` and plus
`conv/bias` (`params/conv1/conv/kernel`, `params/conv1/conv/bias`, `params/fc/...`); there is no "batch_stats".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from darknet_arch import DarknetConfig

_CONV, _BN = "conv", "bn"


def _fold_layer(
    conv: Mapping[str, Any], bn: Mapping[str, Any], stats: Mapping[str, Any], eps: float, path: str
) -> dict:
    """{"kernel": W * s, "bias": bias - mean * s} for one ConvBN (HWIO kernel: s scales the output axis)."""
    if set(conv) != {"kernel"}:
        raise ValueError(f"{path}/{_CONV}: expected only a 'kernel' (a conv without bias), got {sorted(conv)}")
    if set(bn) != {"scale", "bias"} or set(stats) != {"mean", "var"}:
        raise ValueError(
            f"{path}/{_BN}: expected params {{scale, bias}} and batch_stats {{mean, var}}, "
            f"got {sorted(bn)} and {sorted(stats)}"
        )
    kernel = np.asarray(conv["kernel"])
    s = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
    bias = np.asarray(bn["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * s
    return {
        "kernel": jax.numpy.asarray((kernel.astype(np.float64) * s).astype(kernel.dtype)),
        "bias": jax.numpy.asarray(bias.astype(kernel.dtype)),
    }


def _fold_tree(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float, path: str) -> dict:
    out = {}
    for name, value in params.items():
        here = f"{path}/{name}"
        if not isinstance(value, Mapping):
            out[name] = value
        elif _BN in value:
            if _CONV not in value or set(value) != {_CONV, _BN}:
                raise ValueError(f"{here}: a BatchNorm must sit beside one conv, got submodules {sorted(value)}")
            layer_stats = stats.get(name, {}).get(_BN)
            if layer_stats is None:
                raise ValueError(f"batch_stats{here}/{_BN} is missing: pass the variables the model was trained with")
            out[name] = {_CONV: _fold_layer(value[_CONV], value[_BN], layer_stats, eps, here)}
        else:
            out[name] = _fold_tree(value, stats.get(name, {}), eps, here)
    return out


def fold_batchnorm(variables: Mapping[str, Any], config: DarknetConfig) -> dict[str, Any]:
    """Variables of `Darknet53(config=config, bn_folded=True)` from those of the unfolded model (eval mode only)."""
    if "params" not in variables or "batch_stats" not in variables:
        raise ValueError(
            f"fold_batchnorm needs {{'params', 'batch_stats'}} of an unfolded Darknet53, got {sorted(variables)}"
        )
    return {"params": _fold_tree(variables["params"], variables["batch_stats"], config.bn_eps, "")}


def fold_for_inference(model: Any, variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(`model` cloned with bn_folded=True, its folded variables): an unfolded Darknet53 ready for eval only."""
    return model.clone(bn_folded=True), fold_batchnorm(variables, model.config)
