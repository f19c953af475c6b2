"""The compared methods, one module each; importing this package registers them all."""

from baselines import adaptformer, freeze, full, lora  # noqa: F401
