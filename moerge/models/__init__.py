"""Model-side foundations shared by every layer above: the sentence embedder, chat-prompt
encoding and the plain generation records (sampling parameters, results, stream deltas)."""
