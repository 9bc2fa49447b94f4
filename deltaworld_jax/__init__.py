"""deltaworld_jax: DeltaTok and DeltaWorld ("A Frame is Worth One Token", CVPR 2026) in JAX/Flax NNX."""

from flax import nnx as _nnx

# Parameters carry LOGICAL axis names ("embed", "mlp", "heads", ...), never mesh axis names. Flax 0.12
# shards annotated variables eagerly by default, which needs a mesh and logical rules at construction
# time. We turn that off so a model can be built anywhere (a test, a notebook, one device); the trainer
# places parameters explicitly (abstract shapes -> partition specs from the rules -> jitted init with
# out_shardings), see deltaworld_jax/sharding.py.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
