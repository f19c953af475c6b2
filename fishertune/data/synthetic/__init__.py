"""The procedural street-scene generator behind :func:`fishertune.data.synth.synthesize`:
:mod:`.canvas` (camera and layers), :mod:`.actors` (things), :mod:`.street` (layout), :mod:`.styles`
(the look of each domain)."""
