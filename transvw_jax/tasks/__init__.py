"""The objectives trained on the engine (`transvw_jax.training`): each module builds a
`training.Task` from a config.

- `pretraining`: TransVW and Models Genesis on the visual-word store.
- `segmentation`, `classification`: fine-tuning on labeled data (`transvw_jax.finetune`).
- `autoencoder`: the discovery auto-encoder whose embeddings pick the visual words.
"""
