"""The device mesh: its shape from the config (ICI and DCN sizes per axis), checked
against the devices, and built.

The axes themselves are defined once, in :data:`jaxformer.config.schema.MESH_AXES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxformer.config.schema import MESH_AXES
from jaxformer.errors import ConfigError


def resolve_mesh(
    mesh_cfg: ml_collections.ConfigDict, num_devices: int
) -> tuple[dict[str, int], dict[str, int]]:
    """The (ICI, DCN) sizes of every mesh axis, with at most one ICI -1 filled in.

    The DCN sizes (``mesh.dcn_AXIS``) multiply to the number of slices or processes the
    devices are grouped in; the ICI sizes (``mesh.AXIS``) cover the devices of one group.
    """
    dcn = {axis: int(mesh_cfg[f"dcn_{axis}"]) for axis in MESH_AXES}
    for axis, size in dcn.items():
        if size < 1:
            raise ConfigError(f"config key 'mesh.dcn_{axis}' must be >= 1, got {size}")
    groups = math.prod(dcn.values())
    dcn_keys = ", ".join(f"'mesh.dcn_{axis}'" for axis in MESH_AXES)
    if num_devices % groups:
        raise ConfigError(
            f"config keys {dcn_keys} multiply to {groups}, which does not divide the "
            f"{num_devices} devices"
        )
    per_group = num_devices // groups
    where = f"{num_devices} devices"
    if groups > 1:
        where = f"{per_group} devices per slice/process ({num_devices} in all)"
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {free}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be positive or -1, got {size}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if per_group % fixed:
            raise ConfigError(
                f"mesh {sizes} cannot fill {where}: the fixed axes multiply to "
                f"{fixed}, which does not divide {per_group} (config key 'mesh.{free[0]}')"
            )
        sizes[free[0]] = per_group // fixed
    elif fixed != per_group:
        keys = ", ".join(f"'mesh.{axis}'" for axis in MESH_AXES)
        raise ConfigError(
            f"mesh {sizes} has {fixed} devices but there are {where}; "
            f"set config keys {keys} so their product matches (or use -1 for one of them)"
        )
    return sizes, dcn


def resolve_mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes (ICI x DCN) with at most one -1 filled in; raises if they do not
    cover the devices."""
    ici, dcn = resolve_mesh(mesh_cfg, num_devices)
    return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}


def check_dcn(mesh_cfg: ml_collections.ConfigDict, process_count: int, num_slices: int) -> None:
    """The DCN axes must span exactly the device groups the slow network joins: the TPU
    slices when there are several, else the processes (one per host)."""
    groups = math.prod(int(mesh_cfg[f"dcn_{axis}"]) for axis in MESH_AXES)
    keys = ", ".join(f"'mesh.dcn_{axis}'" for axis in MESH_AXES)
    if num_slices > 1:
        if groups != num_slices:
            raise ConfigError(
                f"the devices span {num_slices} TPU slices but config keys {keys} multiply "
                f"to {groups}; set them so their product is {num_slices} (e.g. "
                f"--config.mesh.dcn_data={num_slices})"
            )
    elif groups > 1 and groups != process_count:
        raise ConfigError(
            f"config keys {keys} multiply to {groups} but the run has {process_count} "
            f"process(es); without TPU slices each DCN group is one process, so their product "
            f"must be {process_count} (or 1 for a mesh without DCN axes)"
        )


def make_mesh(
    shape: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    dcn: Mapping[str, int] | None = None,
) -> Mesh:
    """A mesh with axes ``MESH_AXES`` (an axis ``shape`` omits has size 1); ``shape`` must
    already cover the devices.

    ``dcn`` (sizes per axis, dividing ``shape``) spreads those axes over slices, or over
    processes where devices have no slices: each DCN group (a slice or a process) holds a
    contiguous block of every axis, so only the DCN axes' collectives cross the slow network.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(int(shape.get(axis, 1)) for axis in MESH_AXES)  # absent axes: size 1
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(shape)} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    dcn_sizes = tuple(int((dcn or {}).get(axis, 1)) for axis in MESH_AXES)
    if math.prod(dcn_sizes) > 1:
        from jax.experimental import mesh_utils

        if any(size % d for size, d in zip(sizes, dcn_sizes, strict=True)):
            raise ValueError(f"DCN sizes {dict(dcn or {})} do not divide mesh {dict(shape)}")
        ici_sizes = tuple(size // d for size, d in zip(sizes, dcn_sizes, strict=True))
        slices = {getattr(d, "slice_index", 0) for d in devices}
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_sizes, dcn_sizes, devices, process_is_granule=len(slices) == 1
        )
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def validate_mesh(
    cfg: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, num_slices: int = 1
) -> dict[str, int]:
    """The mesh's validator: the resolved shape (ICI x DCN) for these devices, or a
    ConfigError naming the mesh keys that do not fit them."""
    shape = resolve_mesh_shape(cfg.mesh, num_devices)
    check_dcn(cfg.mesh, process_count, num_slices)
    return shape


def check_layout(cfg: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
    """What the model and data must divide over the resolved mesh: the sequence axis
    splits every row's length, the expert axis the experts."""
    if cfg.data.seq_len % mesh["sequence"]:
        raise ConfigError(
            f"config key 'data.seq_len' ({cfg.data.seq_len}) does not divide over the "
            f"sequence axis (mesh.sequence x mesh.dcn_sequence = {mesh['sequence']} devices)"
        )
    m = cfg.model
    if m.moe_experts and m.moe_experts % mesh["expert"]:
        raise ConfigError(
            f"config key 'mesh.expert' ({mesh['expert']}) must divide model.moe_experts "
            f"({m.moe_experts}): each device of the expert axis holds moe_experts / expert"
        )
