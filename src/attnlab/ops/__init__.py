"""Kernels behind the methods, each with a readable reference beside it:
reference (blockwise softmax with lse / column sums), sparse (flex, the gathered PyTorch kernel),
linear (chunked kernelised attention) and linear_triton (its Triton kernels), fused (torch.compile helper)."""
