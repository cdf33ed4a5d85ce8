"""Darknet-53 weights between PyTorch (torch_ref, the seed, timm), Flax and Darknet, strictly checked.

See docs/porting.md. `load_flax_variables(path)` reads any weights location (a run, a step, an orbax or Hub-layout
directory, any file) with its preprocessing record; `convert(src, dst)` is what the `port-weights` command runs.
"""

from porting.api import Loaded, LoadOptions, fresh_head, load, load_flax_variables
from porting.convert import DIRECTIONS, check_conversion, compare_models, convert, direction_of
from porting.darknet import (
    DEFAULT_HEADER,
    DarknetHeader,
    DarknetWeights,
    darknet_bytes,
    darknet_float_count,
    parse_header,
    read_darknet_weights,
    write_darknet_weights,
)
from porting.errors import PortingError
from porting.files import format_of, read_flax_file, read_torch_file, write_flax_file, write_torch_file
from porting.locations import ACCEPTED, Location, locate
from porting.preprocessing import Preprocessing
from porting.pretrained import FlaxPretrained, TorchPretrained, flax_from_pretrained, torch_from_pretrained
from porting.torch_flax import (
    canonical_from_flax,
    canonical_from_torch,
    canonical_to_flax,
    canonical_to_torch,
    detect_source,
    flax_to_torch_state_dict,
    timm_to_torch_state_dict,
    torch_state_dict_to_flax,
    torch_to_timm_state_dict,
)

__all__ = [
    "ACCEPTED",
    "DEFAULT_HEADER",
    "DIRECTIONS",
    "DarknetHeader",
    "DarknetWeights",
    "FlaxPretrained",
    "LoadOptions",
    "Loaded",
    "Location",
    "PortingError",
    "Preprocessing",
    "TorchPretrained",
    "canonical_from_flax",
    "canonical_from_torch",
    "canonical_to_flax",
    "canonical_to_torch",
    "check_conversion",
    "compare_models",
    "convert",
    "darknet_bytes",
    "darknet_float_count",
    "detect_source",
    "direction_of",
    "flax_from_pretrained",
    "flax_to_torch_state_dict",
    "format_of",
    "fresh_head",
    "load",
    "load_flax_variables",
    "locate",
    "parse_header",
    "read_darknet_weights",
    "read_flax_file",
    "read_torch_file",
    "timm_to_torch_state_dict",
    "torch_from_pretrained",
    "torch_state_dict_to_flax",
    "torch_to_timm_state_dict",
    "write_darknet_weights",
    "write_flax_file",
    "write_torch_file",
]
