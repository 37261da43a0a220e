"""FSDP sharding of parameter pytrees by regex rules (big_vision style).

`SHARDING_RULES` maps a regex over the '/'-joined parameter path (e.g.
'ResBlock_3/Conv_0/kernel', 'DiTBlock_7/mlp_in/kernel') to a tactic: 'fsdp' shards the array over
the mesh's 'fsdp' axis along its largest dimension divisible by that axis' size, when the array
has at least `min_size` elements; 'replicate' keeps a full copy on every device; a
`PartitionSpec` is used as given. The first matching rule wins. When no dimension divides, or the
mesh has no 'fsdp' axis, the array is replicated.
"""

import re
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

FSDP_AXIS = "fsdp"

SHARDING_RULES: tuple[tuple[str, str | PartitionSpec], ...] = (
    (r"(^|/)(kernel|embedding)$", "fsdp"),
    (r".*", "replicate"),
)

# Smaller arrays are replicated: sharding them saves little memory and costs a collective each.
MIN_SHARD_SIZE = 2**16


def fsdp_spec(shape: Sequence[int], axis_size: int, axis: str = FSDP_AXIS) -> PartitionSpec:
    """Shards the largest dimension divisible by axis_size (the last among equals)."""
    dims = [i for i, n in enumerate(shape) if n % axis_size == 0]
    if not dims:
        return PartitionSpec()
    best = max(dims, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * best), axis)


def param_specs(
    params,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | PartitionSpec]] = SHARDING_RULES,
    min_size: int = MIN_SHARD_SIZE,
    axis: str = FSDP_AXIS,
):
    """PartitionSpecs for a params pytree (arrays or jax.ShapeDtypeStruct, e.g. from eval_shape).

    Raises ValueError for a parameter no rule matches or an unknown tactic.
    """
    axis_size = mesh.shape.get(axis, 1)

    def spec(path, leaf) -> PartitionSpec:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        tactic = next((t for pattern, t in rules if re.search(pattern, name)), None)
        if tactic is None:
            raise ValueError(f"no sharding rule matches parameter {name!r}.")
        if isinstance(tactic, PartitionSpec):
            return tactic
        if tactic == "replicate" or axis_size == 1 or leaf.size < min_size:
            return PartitionSpec()
        if tactic == "fsdp":
            return fsdp_spec(leaf.shape, axis_size, axis)
        raise ValueError(
            f"unknown sharding tactic {tactic!r} for {name!r}; expected 'fsdp', 'replicate' or a "
            "PartitionSpec."
        )

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(
    params,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | PartitionSpec]] = SHARDING_RULES,
    min_size: int = MIN_SHARD_SIZE,
    axis: str = FSDP_AXIS,
):
    """NamedShardings on `mesh` for a params pytree (see `param_specs`)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(params, mesh, rules, min_size, axis),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
