"""The speed-ups of the recipe, one module per lever; `plan` decides them all, `apply` is what the recipe calls.

None changes what is learned per token: each is checked against the recipe's own path by a "same math" test, and
Plan.off() runs the recipe exactly as written. docs/speed.md lists them with what each measured.
"""
