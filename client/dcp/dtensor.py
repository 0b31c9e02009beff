"""Sharded (DTensor) state through the native client: ``client.snapshot`` stores dense
tensors, and a DTensor is not one (its bytes live on many ranks). Each DTensor becomes its
local shard plus its placements, global shape and mesh, as plain data, and back; on the
same world and mesh only (resharding is the DCP path's job)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from shardguard.proto.errors import RestoreError

_DTENSOR_KEY = "__sg_dtensor__"


def sharded_state_dict_to_local(state: Any) -> Any:
    """``state`` with every DTensor replaced by plain data ``client.snapshot`` can store:
    its local shard, placements, global shape and stride, and its mesh (device type,
    ranks, dim names). Other leaves are kept as they are (not copied)."""
    return _map_state(state, _dtensor_doc)


def sharded_state_dict_from_local(state: Any, device_mesh: DeviceMesh | None = None) -> Any:
    """The inverse of :func:`sharded_state_dict_to_local`, on the same world.

    Args:
        device_mesh: the mesh to rebuild every DTensor on (e.g. the model's); default:
            one mesh per recorded (device type, ranks, dim names), made here (collective
            for a mesh of more than one dimension).
    """
    meshes: dict[str, DeviceMesh] = {}

    def rebuild(x: Any) -> Any:
        if not (isinstance(x, dict) and x.get(_DTENSOR_KEY)):
            return x
        mesh = device_mesh or _mesh(x["mesh"], meshes)
        if list(mesh.mesh.shape) != list(torch.tensor(x["mesh"]["ranks"]).shape):
            raise ValueError(f"a DTensor of mesh shape {x['mesh']['ranks']} onto mesh {mesh}")
        return DTensor.from_local(x["local"].to(mesh.device_type), mesh,
                                  [_placement(p) for p in x["placements"]], run_check=False,
                                  shape=torch.Size(x["shape"]), stride=tuple(x["stride"]))

    return _map_state(state, rebuild, stop=lambda x: isinstance(x, dict) and _DTENSOR_KEY in x)


def _dtensor_doc(x: Any) -> Any:
    if not isinstance(x, DTensor):
        return x
    mesh = x.device_mesh
    return {_DTENSOR_KEY: 1, "local": x.to_local(), "shape": list(x.shape),
            "stride": list(x.stride()),
            "placements": [_placement_doc(p) for p in x.placements],
            "mesh": {"device_type": mesh.device_type, "ranks": mesh.mesh.tolist(),
                     "dim_names": list(mesh.mesh_dim_names or [])}}


def _placement_doc(p: Any) -> list[Any]:
    if isinstance(p, _StridedShard):
        return ["strided_shard", p.dim, p.split_factor]
    if isinstance(p, Shard):
        return ["shard", p.dim]
    if isinstance(p, Replicate):
        return ["replicate"]
    if isinstance(p, Partial):
        return ["partial", p.reduce_op]
    raise TypeError(f"DTensor placement {p!r} is not supported")


def _placement(doc: list[Any]) -> Any:
    kind = doc[0]
    if kind == "strided_shard":
        return _StridedShard(doc[1], split_factor=doc[2])
    if kind == "shard":
        return Shard(doc[1])
    if kind == "replicate":
        return Replicate()
    if kind == "partial":
        return Partial(doc[1])
    raise RestoreError(f"unknown DTensor placement {doc!r}")


def _mesh(doc: dict[str, Any], made: dict[str, DeviceMesh]) -> DeviceMesh:
    key = repr((doc["device_type"], doc["ranks"], doc["dim_names"]))
    if key not in made:
        names = tuple(doc["dim_names"]) or None
        made[key] = DeviceMesh(doc["device_type"], torch.tensor(doc["ranks"]),
                               mesh_dim_names=names)
    return made[key]


def _map_state(x: Any, fn: Any, stop: Any = None) -> Any:
    """``x`` with ``fn`` applied to every leaf (and to every dict ``stop`` says is one);
    dicts, OrderedDicts (with a module state_dict's ``_metadata``), lists, tuples kept."""
    if stop is not None and stop(x):
        return fn(x)
    if isinstance(x, dict):
        out = type(x)() if type(x) in (dict, OrderedDict) else {}
        for k, v in x.items():
            out[k] = _map_state(v, fn, stop)
        if hasattr(x, "_metadata"):
            out._metadata = x._metadata  # type: ignore[attr-defined]
        return out
    if type(x) in (list, tuple):
        return type(x)(_map_state(v, fn, stop) for v in x)
    return fn(x)
