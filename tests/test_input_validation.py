"""Bad inputs get an InputShapeError that names the expected layout and what was received."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_darknet
import torch_ref
from darknet_arch import InputShapeError


@pytest.fixture(scope="module")
def flax_apply():
    model = flax_darknet.Darknet53()
    variables = model.init(__import__("jax").random.key(0), jnp.zeros((1, 32, 32, 3)))
    return lambda x: model.apply(variables, x)


@pytest.fixture(scope="module")
def torch_model():
    return torch_ref.Darknet53().eval()


@pytest.mark.parametrize(
    ("shape", "dtype", "needle"),
    [
        ((32, 32, 3), np.float32, "rank 3"),
        ((1, 32, 32, 4), np.float32, "with 3 channels, got shape (1, 32, 32, 4)"),
        ((1, 3, 32, 32), np.float32, "looks like an NCHW batch"),
        ((1, 48, 32, 3), np.float32, "multiples of 32"),
        ((1, 0, 0, 3), np.float32, "multiples of 32"),
        ((1, 32, 32, 3), np.uint8, "floating-point"),
        ((1, 32, 32, 3), np.int32, "floating-point"),
    ],
)
def test_flax_model_rejects_bad_input(flax_apply, shape, dtype, needle):
    with pytest.raises(InputShapeError, match="NHWC") as err:
        flax_apply(jnp.zeros(shape, dtype))
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("shape", "dtype", "needle"),
    [
        ((3, 32, 32), torch.float32, "rank 3"),
        ((1, 1, 32, 32), torch.float32, "with 3 channels, got shape (1, 1, 32, 32)"),
        ((1, 32, 32, 3), torch.float32, "looks like an NHWC batch"),
        ((1, 3, 40, 32), torch.float32, "multiples of 32"),
        ((1, 3, 32, 32), torch.uint8, "floating-point"),
    ],
)
def test_torch_model_rejects_bad_input(torch_model, shape, dtype, needle):
    with pytest.raises(InputShapeError, match="NCHW") as err:
        torch_model(torch.zeros(shape, dtype=dtype))
    assert needle in str(err.value)


def test_input_shape_error_is_a_value_error():
    assert issubclass(InputShapeError, ValueError)
