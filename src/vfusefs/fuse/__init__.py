"""The FUSE side: every request handler (`ops`), the inode table and fd budget (`inodes`), who
the caller is (`callers`), and the one place exceptions become errno (`errors`).  It decides
and charges through `domain`, does I/O through `native` on `runtime` workers, and never talks
to the store or a backend itself (that is `state`'s)."""
