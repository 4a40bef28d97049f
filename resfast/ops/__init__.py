"""One file per op: eager reference, autograd, torch.library registration, backend dispatch."""
