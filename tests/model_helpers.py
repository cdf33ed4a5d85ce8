"""Comparisons the model tests share: per-tensor relative closeness of pytrees, torch gradients in Flax layout."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from porting_helpers import torch_key_to_flax


def assert_trees_close(got: Any, want: Any, tol: float) -> None:
    """Same tree paths, and max |got - want| <= tol x max |want| for every leaf (float64 arithmetic)."""
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    assert flat_got.keys() == flat_want.keys(), set(flat_got) ^ set(flat_want)
    for path, w in flat_want.items():
        g, w = np.asarray(flat_got[path], np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, jax.tree_util.keystr(path)
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative max diff {err:.2e} > {tol}"


def torch_tensors_as_flax_tree(tensors: dict[str, np.ndarray]) -> dict:
    """torch_ref-named arrays (e.g. parameter gradients) as a nested Flax tree, transposed to Flax's layout."""
    tree: dict = {}
    for key, value in tensors.items():
        path, transpose = torch_key_to_flax(key)
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.asarray(value) if transpose is None else np.asarray(value).transpose(transpose)
    return tree
