"""The FUSE side: every request handler (`ops`, with its parts `charging`: the quota around
each native call, and `virtual`: the root and host directories, statfs, the vfusefs xattrs),
the inode table (`inodes`), the fd budget that keeps it within RLIMIT_NOFILE (`fdbudget`), the
one place that makes the kernel forget (`kernel`), who the caller is (`callers`), the one place
exceptions become errno (`errors`), and the file API's way into vfolders (`files`).  It decides
and charges through `domain`, does I/O through `native` on `runtime` workers, and never talks
to the store or a backend itself (that is `state`'s)."""
