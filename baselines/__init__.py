"""The compared methods, one module each; importing this package registers them all."""

from baselines import adaptformer, childtune, freeze, full, lora, rein, vpt, vqt  # noqa: F401
