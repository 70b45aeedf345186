"""QT-Mob additions (docs/QTMOB.md): semantic location tokens (RQ-VAE), prefix-trie constrained decoding,
code embeddings / code-generation head for the model, and the mobility-recovery task."""
