"""MHA vs GQA vs MQA vs sliding-window GQA: validation loss against KV-cache size and parameter count."""
