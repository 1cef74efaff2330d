"""Each lab's experiments: the drivers its notebook and the GPU smoke check call."""
