"""Floor 3, meshes and hosts."""
