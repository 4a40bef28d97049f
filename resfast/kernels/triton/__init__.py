"""Triton kernels for the fused BN-ReLU-conv2d op set.

One concern per file; the host launch code and the ``torch.library`` registration live in
:mod:`resfast.ops.triton_ops`. Nothing here imports ``torch.nn``.

* :mod:`.bn_relu`          shared ``@triton.jit`` helpers: the BN-ReLU applied to a loaded tile
* :mod:`.bn_stats`         per-channel mean / biased variance (Chan's merge), per-channel sums
* :mod:`.bn_relu_conv_fwd` implicit-GEMM conv of ``relu(bn(x))`` (tl.dot or direct for small groups)
* :mod:`.bn_relu_conv_fwd_tma` wide groups' forward from a stored ``a = relu(bn(x))`` (a BN-ReLU pass,
  then a conv reading ``a`` and the weights by TMA tensor descriptors)
* :mod:`.bn_relu_conv_bwd` grad of the BN output (with the BN-gradient sums) and of the conv weight / bias
* :mod:`.bn_relu_conv_wgrad` wide groups' weight gradient from the ``a`` the input gradient stores (TMA)
* :mod:`.bn_elemt`         the elementwise BN input gradient
"""
