"""What the daemon serves, in memory: hosts from the config, vfolders from the store.  It never
handles a FUSE request.

- `registry.Registry` puts the parts together; itself it holds start-up, reload, lookups and
  the vfolder lifecycle (create, delete, grants, trash, restore; one at a time per id).
- Its parts, on the state they share (`base.RegistryBase`): `accounting` (usage, limits,
  rescans, consistency), `clones` (clones and snapshots), `feed` (the store's change feed).
- `records`: the Host, Vfolder and Task records the request path reads.
- Beside them: `leases` (quota leases on a shared store), `health` and `netwatch` (host
  health), `uploads` (the file API's unfinished uploads).
"""
