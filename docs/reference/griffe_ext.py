"""A Griffe extension of the API reference (mkdocs.yml, mkdocstrings' ``extensions``): each name documented
once, at its home, except on the public faces.

- The old module paths (``decomp_jax/inject.py``, ``decomp_jax/methods/``, ...: ``decomp_jax.moved.MOVED``)
  are files that alias their new paths at run time. Read statically, such a file is a submodule that hides
  the name its package imports under the same name: ``decomp_jax.inject`` would be the alias module, not
  ``dj.inject`` the function. The alias modules are dropped and the names they hid put back.
- A module that re-exports names of other modules of ours in its ``__all__`` (``app.experiment`` those of
  ``app.config``, ...) does not document them again: they are documented where they are defined. The
  public faces (``FACES``) document every name they export.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe

FACES = {"decomp_jax", "decomp_jax.named", "decomp_jax.sharding", "decomp_jax.nnx"}


class ReferenceAliases(griffe.Extension):
    """Drop the moved paths' alias modules (restoring the imports they shadowed); hide re-exports outside
    the public faces."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "decomp_jax" or "moved" not in pkg.members:
            return
        moved = ast.literal_eval(str(pkg["moved"]["MOVED"].value))
        for old in moved:
            parent_path, leaf = old.rsplit(".", 1)
            parent = pkg if parent_path == pkg.path else pkg[parent_path.split(".", 1)[1]]
            member = parent.members.get(leaf)
            if member is None or member.is_alias or not member.is_module:
                continue
            parent.del_member(leaf)
            if leaf in parent.imports:  # the name the alias module hid (``from ... import inject``)
                parent.set_member(leaf, griffe.Alias(leaf, parent.imports[leaf], parent=parent))
        self._hide_reexports(pkg)

    def _hide_reexports(self, module: griffe.Module) -> None:
        for member in list(module.members.values()):
            if member.is_alias:
                if module.path not in FACES and member.target_path.startswith("decomp_jax."):
                    member.public = False
            elif member.is_module:
                self._hide_reexports(member)
