"""Any list of layer plans trained on the same data, tokens and budget: loss against KV cache, parameters, FLOPs."""
