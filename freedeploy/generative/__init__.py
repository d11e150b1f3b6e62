"""Generative FREE: early exits on a decoder that writes text one token at a time (BLIP-2 with an
OPT language model), trained per token and exported with its key/value cache."""
