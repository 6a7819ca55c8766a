"""Volumes, embedded phantoms, the visual-word store and Grain loaders."""
