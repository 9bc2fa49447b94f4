"""`python -m deltaworld_jax.forecast ...`: the command (see deltaworld_jax/forecast/__init__.py)."""

from absl import app

from deltaworld_jax.forecast import main

if __name__ == "__main__":
    app.run(main)
