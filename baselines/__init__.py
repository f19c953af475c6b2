"""The compared methods, one module each; importing this package registers them all."""

from baselines import freeze, full  # noqa: F401
