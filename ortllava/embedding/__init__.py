"""Processor outputs to the decoder's input embeddings: image features packed and spliced into the prompt."""
