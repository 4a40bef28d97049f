"""The op layer: the op-set contract and its reference, the fused op, its autograd, the shared
dense block, and the backends' op sets. Takes tensors, floats and process groups; never a
module. See docs/design.md for which path each call takes."""
