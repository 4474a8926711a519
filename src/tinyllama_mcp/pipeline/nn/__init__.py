"""Model facts shared by training and serving: the plain-Llama shape, Llama's elementwise ops, NF4 weights."""
