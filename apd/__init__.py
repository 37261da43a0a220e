"""apd: AsyncPatch diffusion, a noise level per token, in JAX/Flax."""

__version__ = "0.1.0"
