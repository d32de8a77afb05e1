"""Floor 3, meshes and hosts: ``distributed`` (many hosts: initialise, barriers, host-local data) and
``sharding`` (meshes, partition rules per architecture, every factor's spec derived from its kernel's).

May import: floors 0-2.
"""
