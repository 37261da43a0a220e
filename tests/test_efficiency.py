"""Pod-scale efficiency: the FSDP-sharded training step of the 620M U-Net's structure, the memory
report's numbers, and the accelerator check's CPU run."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import gpu_mfu
import memory_report

from apd.training import mesh as mesh_lib

# unet-620m's layout (channel multipliers 1:2:3:4, attention at the three lower resolutions,
# concatenating skips, the real config's dropout) at 1/8 of its width and one residual block per
# resolution (the real model has four): the 605M-parameter step does not compile and run in
# minutes on 2 cores, and compilation time grows with the number of blocks. Kernels of 3x3x96x96
# and wider are large enough for the FSDP rules to shard.
REDUCED_620M = {"base": 32, "head_dim": 32, "res_blocks": (1, 1, 1, 1), "middle_blocks": 1}


@pytest.mark.slow
def test_fsdp_step_of_the_620m_structure_equals_the_unsharded_step():
    """data x fsdp = 1 x 8 gives the loss and updated state of one device; the sharded state
    holds 1/8 of every sharded kernel per device, and the memory report sees it."""
    shape = (16, 16, 3)
    config = memory_report.config_for("unet-620m", 8, REDUCED_620M, shape)
    assert config.model.options.dropout > 0  # the real config, dropout included
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (8, *shape)).astype(np.float32),
        "label": rng.integers(0, 1000, 8).astype(np.int32),
    }
    results, memory = {}, {}
    for name, (fsdp, devices) in {
        "one": (1, jax.devices()[:1]),
        "fsdp": (8, jax.devices()),
    }.items():
        run, compiled, _ = memory_report.compile_step(
            config, mesh_lib.make(1, fsdp, devices), shape
        )
        memory[name] = memory_report.memory_per_device(compiled)
        state = run.init()
        if name == "fsdp":
            leaves = jax.tree.leaves(state.params)
            sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
            for x in sharded:
                assert x.addressable_shards[0].data.nbytes * 8 == x.nbytes
            total = sum(x.nbytes for x in leaves)
            assert sum(x.nbytes for x in sharded) > 0.7 * total
        state, metrics = compiled(
            state, memory_report.builder.global_batch(batch, run.batch_sharding)
        )
        results[name] = jax.device_get((state.params, state.opt_state, metrics["loss"]))
    np.testing.assert_allclose(results["one"][2], results["fsdp"][2], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(results["one"][:2]), jax.tree.leaves(results["fsdp"][:2]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Per device, the sharded state (params, EMA, Adam moments) is under half of the whole (at
    # this width 30% of the parameters are arrays too small to shard).
    assert memory["fsdp"]["arguments"] < 0.5 * memory["one"]["arguments"], memory
    for m in memory.values():
        assert m["aliased"] > 0  # the state is donated
        assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]


def test_memory_report_residuals_shrink_with_each_remat_policy():
    """The residuals per remat policy for the real 620M U-Net (traced, nothing computed)."""
    config = memory_report.config_for("unet-620m", 8, memory_report.PRECISIONS["bf16-act"])
    saved = memory_report.residual_bytes(config, memory_report.image_shape("unet-620m"), 1)
    assert list(saved) == ["none", "dots", "projections", "full"]
    assert saved["none"] > saved["dots"] > saved["projections"] > saved["full"] > 0, saved
    assert memory_report.fits(15 * 2**30) == ["80 GiB", "141 GiB"]
    assert memory_report.fits(14 * 2**30) == ["16 GiB", "80 GiB", "141 GiB"]


def test_accelerator_check_variants_and_kernel_families():
    """gpu_mfu's variant names parse into model options, and kernel names into families."""
    options, remat, switches = gpu_mfu.parse_variant("bf16-act+full+explicit-attention")
    assert options == {"dtype": "bfloat16", "activation_dtype": "bfloat16", "remat": "full"}
    assert (remat, switches) == ("full", ("explicit-attention",))
    assert gpu_mfu.parse_variant("f32") == ({"remat": "none"}, "none", ())
    for bad in ("fp16", "bf16+dots+full", "bf16+flash"):
        with pytest.raises(ValueError, match="PRECISION"):
            gpu_mfu.parse_variant(bad)
    families = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": "attention",
        "loop_convert_fusion_3": "fusion",
        "input_reduce_fusion": "fusion",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collective",
        "wrapped_sine": "fusion",
    }
    assert {name: gpu_mfu.kernel_family(name) for name in families} == families
