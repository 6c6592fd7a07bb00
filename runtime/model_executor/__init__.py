"""Running a batch on the model: the model runner, its per-batch forward metadata, CUDA graphs,
tensor-parallel groups, and sampling from the logits."""
