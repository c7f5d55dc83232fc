"""The inference engine: KV cache, prefill/decode, batching, streaming and the sampling pipeline."""
