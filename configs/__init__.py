"""Training configs: `get_config(arg)` per file, loaded by `--config=configs/<file>.py[:arg]`.

common.py holds what every config starts from (the trainer's defaults and the mesh rules); the others import
it as `configs.common`, so the folder above configs/ must be importable (it is when commands run from the
repository's root; deltaworld_jax.main puts it on sys.path for a config given by any path).
"""
