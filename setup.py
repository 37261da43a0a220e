"""apd: AsyncPatch diffusion in JAX/Flax (a noise level per token)."""

import pathlib

import setuptools

# Versions measured to install and work together on Python 3.11 (see WORKSPACE.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    # apd.encode writes latent datasets as ArrayRecord shards (grain reads them).
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    # clu's metric writers (TensorBoard event files) and `tfds build` need TensorFlow; no training
    # maths runs in it.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    # Undeclared needs of TFDS without TensorFlow image decoding, and of the plots and PNG grids.
    "pillow==13.0.0",
    "importlib_resources==7.1.0",
    "matplotlib==3.11.2",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "scipy==1.17.1",
        "ruff==0.17.6",
    ],
    "bench": [
        # The CPU build; an unpinned torch pulls a multi-GB CUDA build.
        "torch==2.13.0",
        "diffusers==0.42.1",
    ],
}

setuptools.setup(
    name="apd",
    version="0.1.0",
    description="AsyncPatch diffusion: diffusion models with a noise level per token, in JAX/Flax.",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["apd", "apd.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
