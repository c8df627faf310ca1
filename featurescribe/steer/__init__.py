"""Steering: hooks that change a model's forward pass at one feature, and what that does.

- `hooks.py`: `Intervention` (clamp one unit, or add a direction) and `steering(...)`, a
  context manager that applies it, per batch row, at a module of the model.
- `generate.py`: `Steerer`, batched next-token distributions and seeded generation with and
  without an intervention (one loop for both, so their speeds compare).
- `source.py`: the intervention of a feature of a `sources` row (neuron or SAE latent).
- `calibrate.py`: the strength that moves the next-token distribution by a target KL.
- `effects.py`: TokenChange output effects (the tokens whose probability rises and falls most).
- `command.py`: the `featurescribe steer` command.
"""
