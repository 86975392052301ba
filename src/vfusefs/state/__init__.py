"""What the daemon serves, in memory (`registry`): hosts from the config, vfolders from the
store, their lifecycle (create, delete, restore; one at a time per id), limits and usage,
rescans, the store's change feed, and invalidation of what the kernel caches.  It never
handles a FUSE request."""
