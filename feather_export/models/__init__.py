"""Models: checkpoint directories, the built-in tiny and shape-only registries, their geometry and tokenizers."""
