"""Import of official weights: DINOv3 (Hugging Face format), DeltaTok, DeltaWorld, DINO-World, task heads.

Each loader builds its model abstractly (nnx.eval_shape) and fills it from the checkpoint, strictly: every
unused or missing key is reported in one error."""
from deltaworld_jax.pretrained.heads import HEAD_KINDS, load_head  # noqa: F401
from deltaworld_jax.pretrained.dinov3 import build_vfm, load_dinov3  # noqa: F401
from deltaworld_jax.pretrained.world import load_deltaworld, load_dinoworld  # noqa: F401
from deltaworld_jax.pretrained.deltatok import load_deltatok  # noqa: F401
