"""Pure loss functions: tensors and callables in, ``(loss, metrics)`` out (no optimisers, no state)."""
